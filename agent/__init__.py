"""nodemesh.agent."""
