"""Spawning on a thread: posix_spawnp through ctypes starts the same child as
os.posix_spawnp, and a task started on the spawn thread keeps every guarantee
of one started inline (its group, exit codes, timeouts, cancel, no zombie)."""
from __future__ import annotations

import os
import signal
import threading

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from agent.core.outcome import Ending
from agent.runner import child as child_module
from agent.runner import cspawn, spawner as spawner_module
from agent.runner.process import start_task
from tests.fakes import StdoutCollector
from agent.runner.spawner import Spawner, may_reap_strangers
from tests.procs import group_members, wait_until_empty

pytestmark = pytest.mark.skipif(not cspawn.available, reason="ctypes posix_spawn: Linux only")

REPORT = ["sh", "-c", 'grep -E "^Sig(Ign|Blk)" /proc/self/status; echo $$; ps -o pgid= -p $$; '
                      'echo "$PROBE"']
"""A child that says which signals it ignores and blocks, its pid and group, and PROBE."""


def _run_prepared(argv, env, fd_map, reset=(signal.SIGPIPE,)) -> int:
    return cspawn.run(cspawn.prepare(argv[0], argv, env, fd_map, reset))


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def test_the_ctypes_spawn_starts_a_group_leader_with_default_signals_and_no_blocked_one():
    """Even from a thread that blocks every signal, as the spawn thread does."""
    read_end, write_end = os.pipe()
    result = {}

    def spawn():
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        result["pid"] = _run_prepared(REPORT, {**os.environ, "PROBE": "given"}, {1: write_end})

    thread = threading.Thread(target=spawn)
    thread.start()
    thread.join()
    os.close(write_end)
    masks = {}
    lines = _read_all(read_end).decode().split("\n")
    for line in lines[:2]:
        name, value = line.split(":")
        masks[name] = int(value, 16)
    pid, pgid, probe = lines[2:5]
    _, status = os.waitpid(result["pid"], 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not masks["SigIgn"] & (1 << (signal.SIGPIPE - 1)), "SIGPIPE is back"
    assert masks["SigBlk"] == 0, "nothing blocked"
    assert int(pid) == int(pgid) == result["pid"], "its own group's leader"
    assert probe == "given"


def test_a_failed_exec_is_an_os_error_with_its_reason(tmp_path):
    with pytest.raises(FileNotFoundError):
        _run_prepared(["/nonexistent/prog"], os.environ, {})
    data = tmp_path / "data"
    data.write_bytes(b"\x7fELF garbage")
    data.chmod(0o755)
    with pytest.raises(OSError, match="Exec format error"):
        _run_prepared([str(data)], os.environ, {})


def test_what_exec_cannot_take_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="null"):
        cspawn.prepare("true", ["true", "a\0b"], os.environ, {}, ())
    with pytest.raises(ValueError, match="environment"):
        cspawn.prepare("true", ["true"], {"A=B": "c"}, {}, ())


def test_the_environment_is_built_once_while_it_stays_the_same():
    first = cspawn.prepare("true", ["true"], {"A": "1"}, {}, ())
    again = cspawn.prepare("true", ["true"], {"A": "1"}, {}, ())
    other = cspawn.prepare("true", ["true"], {"A": "2"}, {}, ())
    for prepared in (first, again, other):
        cspawn.discard(prepared)
    assert first.envp is again.envp and other.envp is not first.envp


class _Start:
    """A start as agent.runner.child makes them: prepared as the thread takes it."""

    def __init__(self, argv, answers, prepared_log):
        self.argv, self.answers, self.prepared_log = argv, answers, prepared_log
        self.dropped = False

    def prepare(self):
        self.prepared_log.append(self.argv[0])
        return cspawn.prepare(self.argv[0], self.argv, os.environ, {}, ())

    def spawned(self, pid, error):
        self.answers.append((self.argv[0], pid, type(error).__name__ if error else None,
                             threading.get_ident()))


@pytest_twisted.ensureDeferred
async def test_the_spawn_thread_hands_each_pid_back_on_the_reactor_a_window_at_a_time():
    from twisted.internet import reactor
    spawner = Spawner(reactor, window=2)
    answers, prepared = [], []
    starts = [_Start(argv, answers, prepared) for argv in (
        ["true"], ["/nonexistent/prog"], ["true"], ["dropped"], ["true"])]
    starts[3].dropped = True  # given up while waiting: never prepared, never answered
    for start in starts:
        spawner.submit(start)
    assert prepared == ["true", "/nonexistent/prog"], "the rest wait, holding nothing"
    assert spawner.queued == 5
    while len(answers) < 4:
        await _later(0.01)
    for _, pid, _, _ in answers:
        if pid:
            os.waitpid(pid, 0)
    assert prepared == ["true", "/nonexistent/prog", "true", "true"]
    assert [(name, bool(pid), error) for name, pid, error, _ in answers] == [
        ("true", True, None), ("/nonexistent/prog", False, "FileNotFoundError"),
        ("true", True, None), ("true", True, None)]
    assert {thread for *_, thread in answers} == {threading.get_ident()}, "on the reactor"
    assert (spawner.queued, spawner.unknown, spawner.spawning) == (0, set(), False)


def _later(seconds: float) -> Deferred:
    from twisted.internet import reactor, task
    return task.deferLater(reactor, seconds, lambda: None)


def test_no_stranger_is_reaped_while_a_child_may_be_unknown(monkeypatch):
    spawner = Spawner(reactor=None)
    monkeypatch.setitem(spawner_module._spawners, -1, spawner)
    assert may_reap_strangers()
    spawner.spawning = True
    assert not may_reap_strangers()
    spawner.spawning = False
    spawner.unknown.add(12345)
    assert child_module.is_task_child(12345), "known as a task before the reactor takes it"


# -- tasks started on the spawn thread: the runner's guarantees hold


@pytest.fixture
def on_the_thread(monkeypatch):
    """Every spawn goes to the spawn thread, however few tasks run."""
    monkeypatch.setattr(child_module, "BUSY", 0)


def _run(argv, timeout=None):
    from twisted.internet import reactor
    sink = StdoutCollector()
    return start_task(reactor, argv, sink, timeout=timeout), sink


@pytest_twisted.ensureDeferred
async def test_a_task_started_on_the_thread_reports_exit_code_output_and_group(on_the_thread):
    runner, sink = _run(["sh", "-c", "ps -o pgid= -p $$; echo err >&2; exit 7"])
    assert runner.pid is None, "started later, on the thread"
    outcome = await runner.ended
    assert (outcome.ending, outcome.exit_code) == (Ending.EXITED, 7)
    assert int(sink.text()) == outcome.pid and sink.sizes[2] == 4
    assert not os.path.exists(f"/proc/{outcome.pid}"), "reaped"


@pytest_twisted.ensureDeferred
async def test_a_task_killed_by_a_signal_on_the_thread_says_so(on_the_thread):
    runner, _ = _run(["sh", "-c", "kill -TERM $$"])
    outcome = await runner.ended
    assert (outcome.ending, outcome.exit_code, outcome.signal) == (
        Ending.SIGNALLED, 128 + signal.SIGTERM, signal.SIGTERM)


@pytest_twisted.ensureDeferred
async def test_a_task_that_cannot_start_on_the_thread_is_a_start_failure(on_the_thread):
    runner, _ = _run(["/nonexistent/prog"])
    outcome = await runner.ended
    assert outcome.ending is Ending.START_FAILED
    assert outcome.error == "cannot start '/nonexistent/prog': No such file or directory"
    assert await runner.spawned is False and await runner.cleaned is True


@pytest_twisted.ensureDeferred
async def test_a_timeout_on_the_thread_kills_the_whole_group(on_the_thread):
    runner, sink = _run(["sh", "-c", "(sleep 60; echo late) & echo early; sleep 60"],
                        timeout=0.3)
    outcome = await runner.ended
    assert (outcome.ending, sink.text()) == (Ending.TIMED_OUT, "early\n")
    assert await runner.cleaned is True
    assert not wait_until_empty(group_members, outcome.pid)


@pytest_twisted.ensureDeferred
async def test_a_cancel_while_the_thread_starts_the_task_ends_it_once_it_runs(on_the_thread):
    runner, _ = _run(["sh", "-c", "sleep 60 & sleep 60"])
    runner.cancel("client disconnected")  # before the reactor has its pid
    assert not runner.ended.called
    outcome = await runner.ended
    assert (outcome.ending, outcome.error) == (Ending.CANCELLED, "client disconnected")
    assert outcome.pid is not None and await runner.cleaned is True
    assert not wait_until_empty(group_members, outcome.pid)


@pytest_twisted.ensureDeferred
async def test_many_tasks_at_once_on_the_thread_all_end_and_leave_no_child(on_the_thread):
    runners = [_run(["sh", "-c", f"exit {n % 5}"])[0] for n in range(40)]
    outcomes = [await runner.ended for runner in runners]
    assert [o.exit_code for o in outcomes] == [n % 5 for n in range(40)]
    assert all(not os.path.exists(f"/proc/{o.pid}") for o in outcomes)
    assert not any(pid in child_module._watched for pid in (o.pid for o in outcomes))


@pytest_twisted.ensureDeferred
async def test_a_cancel_before_the_thread_takes_the_start_runs_nothing(on_the_thread):
    """Past the thread's window, starts wait holding no descriptor; a cancelled one is
    dropped: no process, an outcome that says it never ran."""
    runners = [_run(["sleep", "60"])[0] for _ in range(spawner_module.WINDOW + 4)]
    last = runners[-1]
    last.cancel("client disconnected")
    outcome = await last.ended
    assert (outcome.ending, outcome.error, outcome.started, outcome.pid) == (
        Ending.CANCELLED, "client disconnected", False, None)
    assert await last.spawned is False and await last.cleaned is True
    for runner in runners[:-1]:
        runner.cancel("done")
    outcomes = [await runner.ended for runner in runners[:-1]]
    assert all(o.ending is Ending.CANCELLED for o in outcomes)
    for runner, o in zip(runners[:-1], outcomes):
        assert await runner.cleaned is True
        if o.pid is not None:
            assert not wait_until_empty(group_members, o.pid)
