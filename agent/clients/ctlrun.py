"""agentctl's commands that start tasks and copy their output: run, start, logs.

`run` is a remote process seen as a local one: its stdout and stderr as they
come, its exit status as ours, and a signal to us (Ctrl-C, a closed terminal,
SIGTERM) cancels it, so nothing is left running on the agent that nobody watches.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

from agent.clients.agentapi import AgentApi, ClientError, Refused
from agent.clients.ctlview import exit_status
from agent.clients.follow import IDLE_TIMEOUT, OutputFollower, output_path

CANCEL_TIMEOUT = 120.0
"""A cancel answers once the task's group is verified empty: SIGTERM, --kill-grace, SIGKILL."""
CANCELLING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A signal that ends agentctl (as KeyboardInterrupt does): exit status 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Interrupts:
    """While entered, SIGINT, SIGTERM and SIGHUP raise Interrupted; inside held(), they
    wait for its end, so a request in flight gets its answer (the new task's id) first.

    A signal agentctl was started with ignored (SIGINT in a shell's background job)
    stays ignored.
    """

    def __init__(self, signals=CANCELLING_SIGNALS):
        self._signals = signals
        self._previous: dict[int, object] = {}
        self._holding = False
        self._pending: int | None = None

    def __enter__(self) -> "Interrupts":
        for signum in self._signals:
            previous = signal.getsignal(signum)
            if previous != signal.SIG_IGN:
                self._previous[signum] = previous
                signal.signal(signum, self._arrived)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _arrived(self, signum, frame) -> None:
        if self._holding:
            self._pending = self._pending or signum
            return
        raise Interrupted(signum)

    @contextmanager
    def held(self):
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            pending, self._pending = self._pending, None
            if pending is not None:
                raise Interrupted(pending)


def start_task(api: AgentApi, body: dict) -> dict:
    return api.call("POST", "/tasks", body=body)


def run_task(api: AgentApi, body: dict, console) -> int:
    """Start the task, copy its output until it ends, exit as it did; a signal cancels it."""
    record = None
    with Interrupts() as interrupts:
        try:
            with interrupts.held():
                record = start_task(api, body)
            summary = follow_output(api, record["id"], ("stdout", "stderr"), True, console)
        except ClientError as e:
            if record is None:
                raise
            raise ClientError(f"{e}; task {record['id']} may still be running "
                              f"(agentctl cancel {record['id']})") from None
        except Interrupted as e:
            if record is not None:
                _cancel(api, record["id"], console)
                console.warn(f"task {record['id']} cancelled ({signal.Signals(e.signum).name})")
            return 128 + e.signum
        except BrokenPipeError:
            _cancel(api, record["id"], console)
            raise
    status, why = exit_status(summary)
    if why:
        console.warn(f"task {record['id']}: {why}")
    return status


def follow_output(api: AgentApi, task_id: str, streams, follow: bool, console) -> dict | None:
    """Copy the streams to the console until the output ends; the end summary, if it came."""
    def open_stream(query):
        return api.open("GET", output_path(task_id), query, timeout=IDLE_TIMEOUT,
                        accept="text/event-stream")
    follower = OutputFollower(open_stream, console.write, streams, follow, console.warn)
    return follower.run()


def _cancel(api: AgentApi, task_id: str, console) -> None:
    """Best effort, and said when it fails: the task may still be running."""
    try:
        api.call("POST", f"/tasks/{task_id}/cancel", timeout=CANCEL_TIMEOUT)
    except Refused as e:
        if e.status != 409:  # 409: it had ended already
            console.warn(f"could not cancel task {task_id}: {e}")
    except ClientError as e:
        console.warn(f"could not cancel task {task_id}: {e}")

