"""The task history: records, output spool, retention; written off the reactor thread."""
