"""Command-line clients of the agent."""
