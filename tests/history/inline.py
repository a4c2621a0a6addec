"""A Store whose database work runs at once on the calling thread: no thread, no reactor turn.

For in-memory tests of what sits above the history (the HTTP door under treq's StubTreq):
every read's Deferred has fired by the time it is returned, so a test driven by a
task.Clock never waits for the store's thread or a running reactor.
"""
from __future__ import annotations

from agent.history.store import Store
from agent.history.writer import SerialDatabase


class _CallerIsTheReactor:
    """The reactor as the database sees it when it runs on the reactor's own thread."""

    def __init__(self, reactor):
        self._reactor = reactor

    def callFromThread(self, fn, *args, **kwargs):
        fn(*args, **kwargs)

    def seconds(self) -> float:
        return self._reactor.seconds()


class InlineDatabase(SerialDatabase):
    """SerialDatabase without its thread: each job runs as it is submitted, and each write
    is on disk before write() returns (no coalescing delay: nothing waits in memory)."""

    def __init__(self, connection, reactor, identify, **options):
        super().__init__(connection, _CallerIsTheReactor(reactor), identify, **options)

    def start(self) -> None:
        """No thread to start."""

    def _later(self, hand_over):
        """No delay: the write is on disk before write() returns."""
        hand_over()

    def _submit(self, job) -> None:
        if job is self._FLUSH:
            self._try_flush()
        else:
            self._answer_job(job)

    def _join(self, result):
        return result


def inline_store(data_dir, clock, max_log_bytes: int = 1 << 20, keep_tcp_output: bool = False,
                 identify=lambda pid: None, end_left_behind=lambda groups: []) -> Store:
    """Opened and ready; processes are fakes, so none is identified or ended after a crash."""
    return Store(data_dir, clock, max_log_bytes, keep_tcp_output, identify=identify,
                 end_left_behind=end_left_behind, database=InlineDatabase).open()
