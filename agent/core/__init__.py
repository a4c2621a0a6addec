"""The engine and the rules every door shares: requests, admission, limits, outcomes."""
