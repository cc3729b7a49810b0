"""nodemesh.api."""
