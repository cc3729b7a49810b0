"""nodemesh.sandbox."""
