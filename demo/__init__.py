"""nodemesh.demo."""
