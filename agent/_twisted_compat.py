"""Every private Twisted or CPython name the agent relies on, in one place.

Each name here is outside its owner's public API: an upgrade may rename,
remove or reshape it without a deprecation period. tests/test_twisted_compat.py
has one test per name that fails with "<library> changed <name>" when that
happens, and tests/test_twisted_compat.py also checks that nothing under
agent/ reaches into a private Twisted or CPython name except through here.

Private names that a public API could replace without a change in behaviour
were replaced instead, and are not here: Request._parsePOSTFormSubmission
(Request's parsePOSTFormSubmission argument), fdesc._setCloseOnExec
(os.set_inheritable), StreamServerEndpointService._raiseSynchronously
(strports.service) and ._waitingForPort (an endpoint that wraps listen).

This module imports nothing from agent/, so anything may import it.
"""
from __future__ import annotations

import os

import _signal  # the C half of signal: getsignal without the enum wrapping
from twisted.internet import process as _process
from twisted.internet import tcp as _tcp

PROCESS_HOOKS: dict[str, tuple[str, ...]] = {
    "_trySpawnInsteadOfFork": ("path", "uid", "gid", "executable", "args", "environment",
                               "kwargs"),
    "_fork": ("path", "uid", "gid", "executable", "args", "environment", "**kwargs"),
    "_setupChild": ("fdmap",),
    "_execChild": ("path", "uid", "gid", "executable", "args", "environment"),
}
"""The private methods of twisted.internet.process.Process that
agent.runner.spawn.GroupProcess overrides, with the parameters (after self)
each override takes and passes on.

Process.__init__ calls _fork(path, uid, gid, executable, args, environment,
fdmap=...); _fork asks _trySpawnInsteadOfFork(..., kwargs) first (posix_spawnp;
kwargs is that same dict, holding "fdmap"), and otherwise forks and calls
_setupChild(**kwargs) then _execChild(...) in the child. GroupProcess hooks in
there to start the child as its own process-group leader, map only the
child's descriptors, apply rlimits and report a failed exec through a pipe.
No public alternative: spawnProcess has no process-group, rlimit or
descriptor-mapping options. The test checks each hook by inspect.signature
and that Process still calls them in that order with those arguments.
"""


def twisted_reaps(pid: int) -> bool:
    """Whether Twisted's process reaper owns pid: a task the agent started
    with spawnProcess, not something that escaped a task's group.

    Reaches into twisted.internet.process.reapProcessHandlers, the module-level
    dict (pid -> Process) Twisted's SIGCHLD handling waits on. The agent must
    not waitpid() such a pid itself: Twisted would never see the exit status
    and the task's processEnded would never fire. No public alternative: the
    reactor does not say which pids it is waiting for.
    """
    return pid in _process.reapProcessHandlers


SIGCHLD_HOOK = "agent.runner.child"
"""The key of the agent's handler among Twisted's reap handlers: no pid, so never a child's."""


def hook_sigchld(handler) -> None:
    """Have Twisted's SIGCHLD handling call handler.reapProcess() on every SIGCHLD.

    Twisted's reactor answers SIGCHLD by calling reapProcess() on each value of
    twisted.internet.process.reapProcessHandlers (reapAllProcesses), a dict it
    keys by pid for the Processes it started; the handler goes in under
    SIGCHLD_HOOK, which is no pid, so nothing Twisted does for a pid touches it.
    agent.runner.child reaps its children there. No public alternative: the
    reactor's SIGCHLD handling reaps only for spawnProcess, and installing a
    second SIGCHLD handler would replace the reactor's.
    """
    _process.reapProcessHandlers.setdefault(SIGCHLD_HOOK, handler)


def ignored_signals(nsig: int) -> list[int]:
    """Signal numbers below nsig whose disposition in the agent is SIG_IGN.

    Calls _signal.getsignal, the C function that signal.getsignal wraps:
    signal.getsignal turns every answer into a Handlers enum, 22 us per spawn
    for the 64 signals against 1 us this way, and the runner asks on every
    spawn (an ignored signal must not stay ignored in a task). Public
    alternative: signal.getsignal, the same answer, slower.
    """
    ignore = int(_signal.SIG_IGN)
    return [number for number in range(1, nsig) if _signal.getsignal(number) == ignore]


def environment_bytes() -> dict[bytes, bytes]:
    """A copy of the agent's own environment as bytes, as it is now.

    Copies os.environ._data, the bytes dict os.environ keeps in step with
    putenv (on POSIX). Public alternatives: dict(os.environb) or
    dict(os.environ), which decode and re-encode every variable: 30 us and
    14 us per spawn against 0.4 us for this copy.
    """
    return dict(os.environ._data)


def client_gone(request) -> bool:
    """Whether the connection a twisted.web request came over was lost.

    Reads Request._disconnected, which Request.connectionLost sets to True;
    after it a write is silently dropped and finish() raises, so the HTTP door
    checks it before writing a late answer or an output stream's tail. A
    request without the attribute (a test double) counts as connected.
    Public alternative: request.notifyFinish(), whose Deferred errbacks on the
    same connectionLost; but it is an event, not a state, so every request
    would need a watcher from its arrival and somewhere to keep the answer,
    for the same bit Request already keeps.
    """
    return getattr(request, "_disconnected", False)


def forget_exit_signal(reactor) -> None:
    """Make twistd exit 0 after a SIGTERM or SIGINT that stopped the agent cleanly.

    Clears reactor._exitSignal, which the reactor's sigTerm/sigInt/sigBreak
    handlers set and twistd (twisted.application.app.ApplicationRunner.run,
    then twisted.scripts.twistd.runApp) reads once the reactor has stopped, to
    re-raise the signal and report "killed by a signal". A reactor without the
    attribute (a Clock or MemoryReactor in tests) is left alone. No public
    alternative: twistd has no option for the exit status of a signalled stop.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


def socket_idle(transport) -> bool:
    """Whether transport is a plain socket connection (twisted.internet.tcp.Connection:
    TCP or Unix, not TLS) that holds nothing unsent and may still be written to, so
    bytes sent straight on its socket cannot overtake bytes it has buffered.

    Reads FileDescriptor.dataBuffer, .offset and ._tempDataLen (what write() has
    buffered and doWrite not yet sent) and ._writeDisconnecting/._writeDisconnected
    (a half-close asked for or done). No public alternative: write() always
    buffers until the reactor's next turn, and a transport does not say whether
    it holds anything.
    """
    return (isinstance(transport, _tcp.Connection) and transport.connected
            and not transport.disconnecting and not transport._writeDisconnecting
            and not transport._writeDisconnected and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer))
