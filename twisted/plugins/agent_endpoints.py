"""Endpoint string plugin: `mtls:` (agent.doors.mtls) for `--listen` and `--http`.

Twisted's `serverFromString` finds it by scanning twisted/plugins/, as twistd
finds agent_plugin.py. Scanning only makes the parser; its files are read when
the agent builds an endpoint from a string.
"""
from agent.doors.mtls import MutualTLSServerParser

mtls = MutualTLSServerParser()
