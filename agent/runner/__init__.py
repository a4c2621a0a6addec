"""Runs one task's process group: spawn, output, timeout, kill and verification."""
