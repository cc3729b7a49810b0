"""nodemesh.redirector."""
