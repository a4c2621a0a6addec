"""The task agent: one engine, two front doors (TCP lines and HTTP)."""
