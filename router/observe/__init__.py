"""Observing requests: metrics, the access log, tracing."""
