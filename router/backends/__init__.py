"""The backends: the pool the policies choose from, and their health."""
