"""nodemesh.controlplane."""
