"""Each private Twisted or CPython name in agent/_twisted_compat.py still means what it did.

An upgrade may change a private name without warning; one of these tests then
fails and says which name and where to look. The last tests make sure that no
other module under agent/ reaches into a private name behind the compat
module's back.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import _signal
import pytest
import pytest_twisted
import twisted
from twisted.application import app
from twisted.internet import base, process
from twisted.internet.defer import Deferred
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import _ISupportsExitSignalCapturing
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.scripts import twistd
from twisted.web import http
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from agent import _twisted_compat as compat
from agent.runner.spawn import GroupProcess

ROOT = Path(__file__).resolve().parent.parent
COMPAT = ROOT / "agent" / "_twisted_compat.py"
TWISTED = f"Twisted {twisted.__version__}"
PYTHON = f"Python {sys.version_info.major}.{sys.version_info.minor}"


def changed(who: str, what: str) -> str:
    return f"{who} changed {what}: agent/_twisted_compat.py needs updating"


# --- twisted.internet.process.reapProcessHandlers --------------------------------------------

def test_twisted_keeps_the_pids_it_reaps_in_reapProcessHandlers():
    assert isinstance(getattr(process, "reapProcessHandlers", None), dict), \
        changed(TWISTED, "twisted.internet.process.reapProcessHandlers (no longer a dict)")
    child = subprocess.Popen(["sleep", "30"])
    handler = object()
    try:
        assert not compat.twisted_reaps(child.pid)
        process.registerReapProcessHandler(child.pid, handler)
        try:
            assert compat.twisted_reaps(child.pid), changed(
                TWISTED, "where registerReapProcessHandler keeps the pids it will reap")
        finally:
            process.unregisterReapProcessHandler(child.pid, handler)
        assert not compat.twisted_reaps(child.pid)
    finally:
        child.kill()
        child.wait()


# --- FileDescriptor.dataBuffer, offset, _tempDataLen, _writeDisconnect* --------------------

@pytest_twisted.ensureDeferred
async def test_a_socket_transport_says_when_it_holds_nothing_unsent():
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import StringTransport

    accepted = Deferred()
    factory = Factory.forProtocol(Protocol)
    factory.buildProtocol = lambda addr: _Accepted(accepted)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        transport = (await accepted).transport
        for name in ("dataBuffer", "offset", "_tempDataLen", "_writeDisconnecting",
                     "_writeDisconnected"):
            assert hasattr(transport, name), changed(TWISTED, f"FileDescriptor.{name} (gone)")
        assert compat.socket_idle(transport)
        transport.write(b"x")  # buffered until the reactor's next turn
        assert not compat.socket_idle(transport), \
            changed(TWISTED, "where FileDescriptor.write keeps what it has not sent")
        transport.doWrite()
        assert compat.socket_idle(transport), changed(TWISTED, "FileDescriptor.doWrite")
        transport.loseWriteConnection()
        assert not compat.socket_idle(transport), \
            changed(TWISTED, "FileDescriptor._writeDisconnecting (not set by a half-close)")
        assert not compat.socket_idle(StringTransport()), "only a real socket may be written to"
        transport.loseConnection()
    finally:
        client.close()
        await port.stopListening()


class _Accepted:
    """A protocol that fires a Deferred with itself once connected."""

    def __init__(self, accepted):
        self.accepted = accepted

    def makeConnection(self, transport):
        self.transport = transport
        self.accepted.callback(self)

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass


# --- process.reapProcessHandlers as SIGCHLD's hook ----------------------------------------

def test_a_handler_hooked_on_sigchld_is_asked_to_reap_on_each_sigchld():
    calls = []
    handler = SimpleNamespace(reapProcess=lambda: calls.append("reap"))
    saved = dict(process.reapProcessHandlers)
    try:
        process.reapProcessHandlers.pop(compat.SIGCHLD_HOOK, None)
        compat.hook_sigchld(handler)
        compat.hook_sigchld(SimpleNamespace(reapProcess=lambda: calls.append("second")))
        process.reapAllProcesses()  # what the reactor calls on SIGCHLD
        assert calls == ["reap"], changed(TWISTED, "reapAllProcesses (no longer asks every "
                                                   "value of reapProcessHandlers)")
        assert "process.reapAllProcesses()" in inspect.getsource(
            importlib.import_module("twisted.internet._signals")), \
            changed(TWISTED, "the reactor's SIGCHLD handling (no longer calls reapAllProcesses)")
    finally:
        process.reapProcessHandlers.clear()
        process.reapProcessHandlers.update(saved)


# --- _signal.getsignal -----------------------------------------------------------------------

def test_the_c_getsignal_answers_what_signal_getsignal_does():
    assert callable(getattr(_signal, "getsignal", None)), changed(PYTHON, "_signal.getsignal")
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        expected = [n for n in range(1, signal.NSIG) if signal.getsignal(n) == signal.SIG_IGN]
        assert signal.SIGUSR1 in expected
        assert compat.ignored_signals(signal.NSIG) == expected, \
            changed(PYTHON, "what _signal.getsignal returns")
    finally:
        signal.signal(signal.SIGUSR1, previous)


# --- os.environ._data ------------------------------------------------------------------------

def test_os_environ_keeps_its_bytes_in_data(monkeypatch):
    data = getattr(os.environ, "_data", None)
    assert isinstance(data, dict), changed(PYTHON, "os.environ._data (no longer a dict)")
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in data.items()), \
        changed(PYTHON, "os.environ._data (no longer bytes to bytes)")
    monkeypatch.setenv("AGENT_COMPAT_PROBE", "é")
    copy = compat.environment_bytes()
    assert copy[b"AGENT_COMPAT_PROBE"] == "é".encode(sys.getfilesystemencoding(), "surrogateescape"), \
        changed(PYTHON, "os.environ._data (not kept in step with os.environ)")
    assert copy == dict(os.environb)
    assert copy is not data


# --- twisted.web Request._disconnected -------------------------------------------------------

def test_a_request_knows_its_connection_was_lost():
    assert http.Request.__dict__.get("_disconnected") is False, \
        changed(TWISTED, "twisted.web.http.Request._disconnected (no False class default)")
    request = Request(DummyChannel())
    assert not compat.client_gone(request)
    request.connectionLost(Failure(ConnectionDone()))
    assert compat.client_gone(request), \
        changed(TWISTED, "twisted.web.http.Request._disconnected (not set by connectionLost)")


# --- reactor._exitSignal ---------------------------------------------------------------------

def test_the_reactor_records_the_signal_that_stopped_it_and_twistd_reads_it():
    assert "_exitSignal" in vars(base.ReactorBase), \
        changed(TWISTED, "twisted.internet.base.ReactorBase._exitSignal")
    reactor = SimpleNamespace(callFromThread=lambda f, *a, **kw: None, stop=None)
    base.ReactorBase.sigTerm(reactor, signal.SIGTERM, None)
    assert getattr(reactor, "_exitSignal", None) == signal.SIGTERM, \
        changed(TWISTED, "ReactorBase.sigTerm (no longer sets _exitSignal)")
    compat.forget_exit_signal(reactor)
    assert reactor._exitSignal is None
    assert _ISupportsExitSignalCapturing.implementedBy(EPollReactor), \
        changed(TWISTED, "which reactors twistd asks for _exitSignal")
    for reader in (app.ApplicationRunner.startReactor, twistd.runApp):
        assert "._exitSignal" in inspect.getsource(reader), \
            changed(TWISTED, f"{reader.__qualname__} (no longer reads _exitSignal to exit by it)")


def test_forgetting_the_exit_signal_leaves_a_reactor_without_one_alone():
    clock = SimpleNamespace()
    compat.forget_exit_signal(clock)
    assert not hasattr(clock, "_exitSignal")


# --- Process._fork, _trySpawnInsteadOfFork, _setupChild, _execChild --------------------------

def _parameters(function) -> tuple[str, ...]:
    shown = []
    for parameter in list(inspect.signature(function).parameters.values())[1:]:  # after self
        prefix = {inspect.Parameter.VAR_KEYWORD: "**",
                  inspect.Parameter.VAR_POSITIONAL: "*"}.get(parameter.kind, "")
        shown.append(prefix + parameter.name)
    return tuple(shown)


@pytest.mark.parametrize("hook", sorted(compat.PROCESS_HOOKS))
def test_process_still_has_the_hook_the_runner_overrides(hook):
    original = getattr(process.Process, hook, None)
    assert original is not None, changed(TWISTED, f"twisted.internet.process.Process.{hook} (gone)")
    assert _parameters(original) == compat.PROCESS_HOOKS[hook], \
        changed(TWISTED, f"the parameters of Process.{hook}: {_parameters(original)}")
    assert _parameters(getattr(GroupProcess, hook)) == compat.PROCESS_HOOKS[hook], \
        f"GroupProcess.{hook} no longer takes what agent/_twisted_compat.py says it does"


class _Asked(Exception):
    pass


class _Recording(process.Process):
    def _trySpawnInsteadOfFork(self, *args):
        raise _Asked(args)


def test_process_hands_its_fdmap_to_fork_and_fork_asks_to_spawn_first():
    with pytest.raises(_Asked) as asked:
        _Recording(MemoryReactor(), "true", ["true"], {b"K": b"v"}, None, ProcessProtocol(),
                   childFDs={0: "w", 1: "r", 2: "r"})
    *leading, kwargs = asked.value.args[0]
    assert leading == [None, None, None, "true", ["true"], {b"K": b"v"}], \
        changed(TWISTED, "the arguments Process passes to _fork and _trySpawnInsteadOfFork")
    assert list(kwargs) == ["fdmap"] and set(kwargs["fdmap"]) == {0, 1, 2}, \
        changed(TWISTED, "the kwargs (fdmap) Process passes to _fork and _trySpawnInsteadOfFork")


def test_fork_sets_up_then_execs_the_child_with_its_own_arguments():
    tree = ast.parse(inspect.getsource(process.Process._fork).lstrip())
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "self":
            calls.setdefault(node.func.attr, node)
    setup, execute = calls.get("_setupChild"), calls.get("_execChild")
    assert setup is not None and execute is not None, \
        changed(TWISTED, "Process._fork (no longer calls _setupChild and _execChild)")
    assert ast.unparse(setup) == "self._setupChild(**kwargs)", \
        changed(TWISTED, f"how Process._fork calls _setupChild: {ast.unparse(setup)}")
    assert ast.unparse(execute) == "self._execChild(path, uid, gid, executable, args, environment)", \
        changed(TWISTED, f"how Process._fork calls _execChild: {ast.unparse(execute)}")
    assert setup.lineno < execute.lineno


# --- no private names outside the compat module ----------------------------------------------

PUBLIC_UNDERSCORE = {"_exit"}
"""os._exit: documented CPython API despite its name."""

PRIVATE_WITHOUT_UNDERSCORE = {"reapProcessHandlers", "registerReapProcessHandler",
                              "unregisterReapProcessHandler", "reapAllProcesses"}
"""twisted.internet.process's reaper bookkeeping: no underscore, but no public API either."""

AGENT_OWN = {
    ("agent/core/engine.py", "_waiting_for_slot"),
    ("agent/core/engine.py", "_cleanup_waiters"),
    ("agent/core/engine.py", "_waiters"),
    ("agent/core/engine.py", "_let_go"),
}
"""The engine reaching into its own Task (agent/core/task.py): the agent's
private names, not Twisted's or CPython's."""


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _foreign_private(name: str) -> bool:
    return _private(name) or name in PRIVATE_WITHOUT_UNDERSCORE


def _agent_files() -> list[Path]:
    return sorted(path for path in (ROOT / "agent").rglob("*.py") if path != COMPAT)


def _methods_by_call(tree: ast.AST) -> dict[ast.AST, str]:
    """Every node -> the name of the function it is in."""
    inside = {}
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                inside[node] = function.name
    return inside


def _private_uses(path: Path) -> list[str]:
    """Places in one module that use a private name of something not the agent's."""
    relative = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(), relative)
    inside = _methods_by_call(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{relative}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {alias.name}" for alias in node.names
                      if any(_private(part) for part in alias.name.split("."))]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 \
                and not (node.module or "").startswith("agent"):
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"{where}: from {node.module} import ...")
            found += [f"{where}: from {node.module} import {alias.name}"
                      for alias in node.names if _foreign_private(alias.name)]
        elif isinstance(node, ast.Attribute) and _foreign_private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue  # the class's own or inherited names: the override check below
            if isinstance(owner, ast.Call) and ast.unparse(owner.func) == "super" \
                    and inside.get(node) == node.attr:
                continue  # an override calling the method it overrides: same check
            if node.attr in PUBLIC_UNDERSCORE or (relative, node.attr) in AGENT_OWN:
                continue
            found.append(f"{where}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and _private(node.args[1].value):
            owner = node.args[0]
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(f"{where}: {ast.unparse(node)}")
    return found


def test_no_private_names_outside_the_compat_module():
    found = [use for path in _agent_files() for use in _private_uses(path)]
    assert found == [], ("private Twisted or CPython names used outside agent/_twisted_compat.py "
                         "(move each there, with a test here):\n" + "\n".join(found))


def test_the_agent_own_names_allowed_are_the_agent_own():
    task = (ROOT / "agent" / "core" / "task.py").read_text()
    for _, name in AGENT_OWN:
        assert re.search(rf"(self\.{name}\b.*=|def {name}\()", task), \
            f"{name} is not defined by agent/core/task.py: it is not the agent's own"


def _names_in_source(cls) -> set[str]:
    """Private names a class defines or uses through self, as written in its source."""
    tree = ast.parse(inspect.getsource(cls))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "self":
            names.add(node.attr)
    body = tree.body[0].body
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if _private(name)}


def _known_to(foreign, name: str) -> bool:
    if name in vars(foreign):
        return True
    try:
        source = inspect.getsource(foreign)
    except (OSError, TypeError):
        return False
    return re.search(rf"\bself\.{re.escape(name)}\b", source) is not None


def _agent_classes():
    for path in _agent_files():
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if inspect.isclass(cls) and cls.__module__ == name:
                yield cls


def test_no_class_overrides_or_reuses_a_private_twisted_name_the_compat_module_does_not_name():
    declared = {(GroupProcess, hook) for hook in compat.PROCESS_HOOKS}
    found = []
    for cls in _agent_classes():
        foreign = [b for b in cls.__mro__[1:]
                   if b is not object and not b.__module__.startswith("agent")]
        for name in sorted(_names_in_source(cls)) if foreign else ():
            owners = [b for b in foreign if _known_to(b, name)]
            if owners and (cls, name) not in declared:
                found.append(f"{cls.__module__}.{cls.__qualname__}.{name} "
                             f"(also {owners[0].__module__}.{owners[0].__qualname__}'s)")
    assert found == [], ("agent classes override or reuse a private name of a Twisted or CPython "
                         "base class; declare it in agent/_twisted_compat.py with a test, or "
                         "rename the agent's own:\n" + "\n".join(found))
