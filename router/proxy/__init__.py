"""The request path: read the request, route it, forward it inside its lifecycle."""
