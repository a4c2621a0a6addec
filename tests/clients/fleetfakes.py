"""The fleet's store in memory behind a Database's interface, for agent-scheduler --fleet's
unit tests: what run(f, *args) answers, when, and when the database is away are the test's."""
from __future__ import annotations

from types import SimpleNamespace

from datetime import datetime, timedelta, timezone

from twisted.internet.defer import Deferred, succeed

from agent.fleet.database import Unavailable
from agent.fleet.records import FleetTask, Submission

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def fleet_task(key: str, command=("true",), *, state="finished", exit_code=0, error="",
               stdout=b"", stdout_bytes=None, duration_ms=1.5, node="n1", attempt=1,
               started=T0, seq=1, ended_after=1.0, local_task_id="local") -> FleetTask:
    """An ended (or any) task's record as the store would read it."""
    return FleetTask(
        key=key, seq=seq, command=tuple(command), timeout=None, limits={}, labels={},
        state=state, attempt=attempt, max_attempts=3, node_id=node, submitted_by="test",
        submitted_at=T0, started_at=started,
        ended_at=None if state in ("queued", "running") else T0 + timedelta(seconds=ended_after),
        cancel_requested_at=None, ending="exited", exit_code=exit_code, error=error,
        duration_ms=duration_ms, stdout_tail=stdout, stderr_tail=b"",
        stdout_bytes=len(stdout) if stdout_bytes is None else stdout_bytes, stderr_bytes=0,
        local_task_id=local_task_id)


class FakeFleet:
    """run(f, *args) answers as the store's function of that name would. With hold=True
    each answer waits for answer(), so calls overlap as on the database's thread; while
    `down` names an error every call fails with Unavailable, as with a lost connection."""

    def __init__(self, hold: bool = False):
        self.hold = hold
        self.down: str | None = None
        self.broken: Exception | None = None
        self.lose_answer_of: str | None = None
        """The next call of this name is done, but its answer is lost with the connection."""
        self.tasks: dict[str, FleetTask] = {}
        self.nodes: list = [SimpleNamespace(node_id="n1", labels={"os": "linux"})]
        self.calls: list[tuple[str, tuple]] = []
        self.closed = False
        self._held: list[tuple[Deferred, str, tuple]] = []
        self._seq = 0

    # -- Database's interface

    def run(self, f, *args) -> Deferred:
        name = f.__name__
        self.calls.append((name, args))
        d = Deferred()
        self._held.append((d, name, args))
        if not self.hold:
            self.answer()
        return d

    def close(self) -> Deferred:
        self.closed = True
        return succeed(None)

    def answer(self) -> None:
        """Answer every held call, and those they make meanwhile."""
        while self._held:
            d, name, args = self._held.pop(0)
            if self.down is not None:
                d.errback(Unavailable(self.down))
            elif self.broken is not None and name != "prepare_schema":
                d.errback(self.broken)
            elif self.lose_answer_of == name:
                self.lose_answer_of = None
                getattr(self, name)(*args)
                d.errback(Unavailable("server closed the connection unexpectedly"))
            else:
                d.callback(getattr(self, name)(*args))

    # -- the store

    def prepare_schema(self) -> None:
        return None

    def submit_many(self, batch: list[Submission], submitted_by) -> list[str]:
        answers = []
        for task in batch:
            known = self.tasks.get(task.key)
            if known is None:
                self._seq += 1
                self.tasks[task.key] = fleet_task(task.key, task.command, state="queued",
                                                  seq=self._seq)
                answers.append("created")
            else:
                answers.append("attached" if known.command == task.command else "conflict")
        return answers

    def list_nodes(self, include_gone: bool = True) -> list:
        return self.nodes

    def ended(self, keys) -> list[FleetTask]:
        return [self.tasks[k] for k in keys if k in self.tasks and self.tasks[k].ended]

    def ended_keys(self, keys) -> list[str]:
        return [task.key for task in self.ended(keys)]

    # -- the test's hand

    def finish(self, key: str, **fields) -> None:
        """The task ends (as a node would report it), with fleet_task's fields."""
        known = self.tasks[key]
        fields.setdefault("ended_after", float(known.seq))
        self.tasks[key] = fleet_task(key, known.command, seq=known.seq, **fields)

    def calls_of(self, name: str) -> list[tuple]:
        return [args for called, args in self.calls if called == name]


class FakeListener:
    """What Submitter's listen() returns: the test calls received and reconnected."""

    def __init__(self, received, reconnected):
        self.received = received
        self.reconnected = reconnected
        self.started = False
        self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> Deferred:
        self.stopped = True
        return succeed(None)
