"""Serving: the HTTP server, worker processes, systemd, reload."""
