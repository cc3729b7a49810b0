"""nodemesh.cli."""
