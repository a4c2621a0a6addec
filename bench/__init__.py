"""Benchmarks: the agent measured side by side with the bare limit, in one run.

`python -m bench` (or `make bench`) starts a real `twistd -n agent` per case,
drives it with a lean client from this process, measures the matching
baseline in the same run, and prints one table (also written as JSON).
"""
