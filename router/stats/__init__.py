"""Statistics the router keeps: request stats fed by the lifecycle events."""
