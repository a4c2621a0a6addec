"""The fleet's store: one PostgreSQL database holding the queue, node leases, results and
fleet-wide idempotency. Plain functions on a psycopg connection (tasks, nodes, schema),
run off the reactor thread by agent.fleet.database; the fleet door and the submitters use it."""
