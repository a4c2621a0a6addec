"""The fleet door: this node as a worker of the fleet's PostgreSQL queue (issue 12)."""
