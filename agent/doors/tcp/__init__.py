"""The TCP door: newline-delimited JSON task requests and results."""
