"""twistd plugin: `twistd -n agent` builds the service in agent.service.

Nothing is imported at plugin-scan time beyond ServiceMaker itself.
"""
from twisted.application.service import ServiceMaker

agent = ServiceMaker(
    "agent",
    "agent.service",
    "Per-node task agent: runs commands sent over TCP (NDJSON) and HTTP.",
    "agent",
)
