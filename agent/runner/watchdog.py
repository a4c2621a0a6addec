"""The agent's side of its watchdog process: tasks die with the agent, fleet tasks with the lease.

A kill -9 or a crash of the agent used to leave its running task groups
alive until the next start; in a fleet another node would run the same
task meanwhile. The watchdog (agent.runner.watchdog_main) is a separate
process, in a session of its own, reading a pipe from the agent: when the
pipe ends without a "bye" it SIGKILLs every watched group, grandchildren
included. A parent-death signal would reach only each task's first process.

The agent tells it each task group as the task starts (observe) and lets it
go once the group's cleanup is verified (observe_cleanup), so a reused pid
is never killed for an old task. Fleet tasks are "fenced": the fleet door
sends lease(seconds) after each renewal of the node's lease, and the
watchdog SIGKILLs the fenced groups when that much time passes with no new
one, even while the agent is stopped or cut off; it says so, and this logs it.

Each watch is written at once, not at the reactor's next turn, so a task
is guarded from the moment it starts (a forget may wait to share a write).
If the watchdog dies, another is started (at most one a second) and told
every watched group and the lease.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IWriteDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from zope.interface import implementer

from agent.runner import watchdog_wire as wire
from agent.runner.spawn import spawn_in_group
from agent.runner.watchdog_main import IGNORED_SIGNALS

log = Logger()

COMMAND = (sys.executable, "-m", "agent.runner.watchdog_main")

RESTART_INTERVAL = 1.0
"""Least seconds between two starts of the watchdog: one that cannot live is
not restarted in a loop."""

STOP_TIMEOUT = 5.0
"""Seconds a watchdog told "bye" has to exit before it is SIGKILLed."""

FORGET_DELAY = 1.0
"""Most seconds a "forget" waits to go with the next "watch" in one write: a
watch must be written at once, a forget only keeps the watchdog from killing
an empty group's number, which the kernel hands out again only after going
round every other pid. Serial tasks then cost one write each, not two."""


def is_fleet_task(task) -> bool:
    """Fleet tasks are fenced: they must not outlive the node's lease."""
    return task.source == "fleet"


class Watchdog:
    """Starts and feeds the watchdog process, and starts another if it dies."""

    def __init__(self, reactor, *, fenced: Callable[[object], bool] = is_fleet_task,
                 launch=None, restart_interval: float = RESTART_INTERVAL,
                 stop_timeout: float = STOP_TIMEOUT):
        """fenced(task): whether a task's group dies with the lease.
        launch(reactor, protocol) -> (process transport, line writer): starts one
        watchdog process (default: launch_process, the real program)."""
        self._reactor = reactor
        self._fenced = fenced
        self._launch = launch_process if launch is None else launch
        self._restart_interval = restart_interval
        self._stop_timeout = stop_timeout
        self._watched: dict[int, bool] = {}
        """pgid -> fenced: what the watchdog is told, and told again if it restarts."""
        self._lease_until: float | None = None
        """When the lease runs out, on the reactor's clock (to tell a new watchdog)."""
        self._forgets: dict[int, None] = {}
        """Groups forgotten here and not yet in the pipe (see FORGET_DELAY), in order."""
        self._forget_call = None
        self._running = False
        self._process: _WatchdogProtocol | None = None
        self._writer = None
        self._started_at: float | None = None
        self._restart_call = None
        self._kill_call = None
        self._stopped: Deferred | None = None
        self.starts = 0
        """Watchdog processes started so far (more than one: it died and was replaced)."""

    # -- the service's life

    def start(self) -> None:
        self._running = True
        self._start_one()

    def stop(self) -> Deferred:
        """At a clean stop, after the tasks have ended: "bye", and wait for the exit."""
        self._running = False
        self._cancel("_restart_call")
        self._cancel("_forget_call")
        if self._process is None:
            return succeed(None)
        if self._stopped is None:
            self._stopped = Deferred()
            self._writer.write(wire.encode(wire.Bye()))
            self._writer.close()
            self._kill_call = self._reactor.callLater(self._stop_timeout, self._kill_stuck)
        return self._stopped

    # -- what the engine tells

    def observe(self, task) -> None:
        """An engine observer: a task now running has a group to guard."""
        runner = task.runner
        if task.state != "running" or runner is None or runner.pid is None or runner.finished:
            return
        self.watch(runner.pid, fenced=self._fenced(task))

    def observe_cleanup(self, task) -> None:
        """An engine cleanup observer: the group is verified empty (or given up on),
        so its number may soon be another's."""
        if task.runner is not None and task.runner.pid is not None:
            self.forget(task.runner.pid)

    # -- messages

    def watch(self, pgid: int, fenced: bool = False) -> None:
        """Written at once, with the forgets waiting (a new task's group may have
        a forgotten one's number: its forget goes no further)."""
        self._watched[wire.checked_pgid(pgid)] = fenced
        self._forgets.pop(pgid, None)
        self._send(*self._take_forgets(), wire.Watch(pgid, fenced))

    def forget(self, pgid: int) -> None:
        """Written with the next watch, or within FORGET_DELAY."""
        if self._watched.pop(pgid, None) is None:
            return
        self._forgets[pgid] = None
        if self._forget_call is None and self._writer is not None and self._stopped is None:
            self._forget_call = self._reactor.callLater(FORGET_DELAY, self._send_forgets)

    def lease(self, seconds: float) -> None:
        """The node holds its lease for `seconds` more: fenced groups live that long
        unless a new lease comes. Send less than the lease's true remaining time."""
        seconds = wire.checked_seconds(seconds)
        self._lease_until = self._reactor.seconds() + seconds
        self._send(wire.Lease(seconds))

    def no_lease(self) -> None:
        self._lease_until = None
        self._send(wire.NoLease())

    @property
    def watched(self) -> dict[int, bool]:
        """pgid -> fenced, as the watchdog was told (a copy)."""
        return dict(self._watched)

    def _send(self, *messages) -> None:
        """One write for them all: one syscall, one wake-up of the watchdog."""
        if self._writer is not None and self._stopped is None:
            self._writer.write(b"".join(map(wire.encode, messages)))

    def _take_forgets(self) -> list[wire.Forget]:
        """The forgets waiting, now to be sent. Their timer is left to fire (and
        maybe find none): arming and cancelling one per task costs more than it."""
        if not self._forgets:
            return []
        forgets, self._forgets = self._forgets, {}
        return [wire.Forget(pgid) for pgid in forgets]

    def _send_forgets(self) -> None:
        self._forget_call = None
        if self._forgets:
            self._send(*self._take_forgets())

    # -- the process

    def _start_one(self) -> None:
        self._restart_call = None
        self._started_at = self._reactor.seconds()
        protocol = _WatchdogProtocol(self)
        try:
            transport, writer = self._launch(self._reactor, protocol)
        except OSError as e:
            log.error("cannot start the watchdog ({error}): a kill -9 of the agent would leave "
                      "its tasks running", error=str(e))
            self._restart_later()
            return
        self._process, self._writer = protocol, writer
        self.starts += 1
        self._tell_everything()  # before saying it started: then it knows every group
        log.info("watchdog {pid} started: task groups die with the agent", pid=transport.pid)

    def _tell_everything(self) -> None:
        """A new watchdog learns what the last one knew (and has nothing to forget)."""
        self._take_forgets()
        self._cancel("_forget_call")
        messages = [wire.Watch(pgid, fenced) for pgid, fenced in self._watched.items()]
        if self._lease_until is not None:
            messages.append(wire.Lease(max(0.0, self._lease_until - self._reactor.seconds())))
        if messages:
            self._send(*messages)

    def _restart_later(self) -> None:
        if not self._running or self._restart_call is not None:
            return
        delay = max(0.0, self._started_at + self._restart_interval - self._reactor.seconds())
        self._restart_call = self._reactor.callLater(delay, self._start_one)

    def process_ended(self, protocol: _WatchdogProtocol, reason) -> None:
        """Its protocol's processEnded: expected after bye, else a reason to start another."""
        if protocol is not self._process:
            return
        self._process = None
        self._writer.close()
        self._writer = None
        if self._stopped is not None:
            self._cancel("_kill_call")
            stopped, self._stopped = self._stopped, None
            stopped.callback(None)
        elif self._running:
            log.error("watchdog {pid} ended ({reason}); starting another", pid=protocol.pid,
                      reason=reason.getErrorMessage())
            self._restart_later()

    def heard(self, line: bytes) -> None:
        """A line from the watchdog's stdout."""
        try:
            report = wire.parse_report(line)
        except wire.BadMessage as e:
            log.error("watchdog: {error}", error=str(e))
            return
        if isinstance(report, wire.Fenced):
            for pgid in report.pgids:
                self._watched.pop(pgid, None)
            log.warn("the lease ran out: the watchdog killed fenced task group(s) {pgids}",
                     pgids=list(report.pgids))
        else:
            log.error("watchdog could not read the agent: {text}", text=report.text)

    def _kill_stuck(self) -> None:
        self._kill_call = None
        if self._process is not None:
            log.error("watchdog {pid} did not exit within {seconds} s of bye; killing it",
                      pid=self._process.pid, seconds=self._stop_timeout)
            self._process.kill()

    def _cancel(self, name: str) -> None:
        call = getattr(self, name)
        setattr(self, name, None)
        if call is not None and call.active():
            call.cancel()


class _WatchdogProtocol(ProcessProtocol):
    """Thin: hands the watchdog's lines and its end to the Watchdog."""

    def __init__(self, owner: Watchdog):
        self._owner = owner
        self._pending = b""
        self.pid: int | None = None

    def connectionMade(self):
        self.pid = self.transport.pid

    def outReceived(self, data: bytes):
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()[-wire.MAX_LINE:]
        for line in lines:
            self._owner.heard(line)

    def errReceived(self, data: bytes):
        log.error("watchdog {pid} wrote to stderr: {text}", pid=self.pid,
                  text=data.decode("utf-8", "replace").rstrip())

    def processEnded(self, reason):
        self._owner.process_ended(self, reason)

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except Exception:  # already exited: processEnded is on its way
            pass


def launch_process(reactor, protocol: ProcessProtocol, command=COMMAND):
    """Start the watchdog program in a session of its own, deaf to the signals
    that stop the agent from its first instruction on; return (transport, writer).

    Its stdin is a pipe whose write end only the agent holds (close-on-exec,
    like every descriptor Python opens, so no task inherits it), which is
    why its end means the agent is gone.
    """
    child_end, agent_end = os.pipe()
    try:
        transport = spawn_in_group(reactor, protocol, command,
                                   child_fds={0: child_end, 1: "r", 2: "r"}, new_session=True,
                                   ignore_signals=IGNORED_SIGNALS)
    except BaseException:
        os.close(agent_end)
        raise
    finally:
        os.close(child_end)
    return transport, LineWriter(reactor, agent_end)


@implementer(IWriteDescriptor)
class LineWriter:
    """The agent's end of the watchdog's stdin. Each line is written at once
    (one write under PIPE_BUF: whole or not at all), since a task must be
    guarded before the agent could die; only a full pipe (a stopped watchdog)
    makes it wait for the reactor."""

    def __init__(self, reactor, fd: int):
        os.set_blocking(fd, False)
        self._reactor = reactor
        self._fd: int | None = fd
        self._pending = bytearray()
        self._closing = False

    def write(self, data: bytes) -> None:
        if self._fd is None:
            return
        if not self._pending:
            try:
                data = data[os.write(self._fd, data):]
            except BlockingIOError:
                pass
            except OSError:  # EPIPE: the watchdog is gone, and its end will be reported
                self._close()
                return
            if not data:
                return
            self._reactor.addWriter(self)
        self._pending += data

    def close(self) -> None:
        """Once what is pending is written: the watchdog then reads its end."""
        if self._pending:
            self._closing = True
        else:
            self._close()

    @property
    def closed(self) -> bool:
        return self._fd is None

    def doWrite(self):
        try:
            written = os.write(self._fd, self._pending)
        except BlockingIOError:
            return None
        except OSError:
            self._close()
            return None
        del self._pending[:written]
        if not self._pending:
            self._reactor.removeWriter(self)
            if self._closing:
                self._close()
        return None

    def fileno(self) -> int:
        return -1 if self._fd is None else self._fd

    def connectionLost(self, reason) -> None:
        self._close()

    def logPrefix(self) -> str:
        return "watchdog pipe"

    def _close(self) -> None:
        if self._fd is None:
            return
        if self._pending:
            self._reactor.removeWriter(self)
            self._pending.clear()
        os.close(self._fd)
        self._fd = None
