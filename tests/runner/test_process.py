"""The runner: timers on a Clock, and real children in their own process groups."""
from __future__ import annotations

import os
import signal
import stat
import sys

import pytest
import pytest_twisted
from twisted.internet import error, task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from agent.core.outcome import Ending
from agent.runner.process import DRAIN_GRACE, start_task
from agent.runner.spawn import spawn_in_group
from tests.fakes import FakeSpawner, KillRecorder, StdoutCollector, exit_with
from tests.procs import group_members, wait_until_empty


class RunnerTimers(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.spawn = FakeSpawner()
        self.kills = KillRecorder()
        self.sink = StdoutCollector()

    def start(self, timeout=None, argv=("cmd",)):
        runner = start_task(self.clock, argv, self.sink, timeout=timeout, spawn=self.spawn,
                            killpg=self.kills,
                           group_alive=self.kills.group_alive)
        return runner

    def test_exit_reports_status_and_duration(self):
        runner = self.start()
        self.clock.advance(0.25)
        exit_with(runner, 3)
        outcome = self.successResultOf(runner.ended)
        self.assertEqual((outcome.ending, outcome.exit_code, outcome.error), (Ending.EXITED, 3, ""))
        self.assertEqual((outcome.started_at, outcome.duration_ms), (1000, 250))

    def test_timeout_kills_the_group_and_answers_at_once(self):
        runner = self.start(timeout=2)
        self.clock.advance(1.9)
        self.assertNoResult(runner.ended)
        self.clock.advance(0.1)
        outcome = self.successResultOf(runner.ended)
        self.assertEqual((outcome.ending, outcome.exit_code, outcome.error),
                         (Ending.TIMED_OUT, -1, "timeout exceeded"))
        self.assertIn((runner.pid, signal.SIGKILL), self.kills.calls)
        self.assertTrue(runner.transport.lost, "pipes held by a grandchild must be let go")

    def test_late_exit_after_timeout_changes_nothing(self):
        runner = self.start(timeout=1)
        self.clock.advance(1)
        exit_with(runner, signal=signal.SIGKILL)
        self.assertEqual(self.successResultOf(runner.ended).ending, Ending.TIMED_OUT)

    def test_no_timer_outlives_the_task(self):
        runner = self.start(timeout=5)
        exit_with(runner, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_signal_from_elsewhere_is_128_plus_n_and_named(self):
        runner = self.start()
        exit_with(runner, signal=signal.SIGSEGV)
        outcome = self.successResultOf(runner.ended)
        self.assertEqual((outcome.exit_code, outcome.error, outcome.signal),
                         (139, "killed by signal 11 (SIGSEGV)", 11))

    def test_cancel_without_grace_kills_at_once(self):
        runner = self.start()
        runner.cancel("client disconnected")
        outcome = self.successResultOf(runner.ended)
        self.assertEqual((outcome.ending, outcome.error), (Ending.CANCELLED, "client disconnected"))
        self.assertEqual(self.kills.calls[0], (runner.pid, signal.SIGKILL))

    def test_cancel_with_grace_terms_then_kills(self):
        runner = self.start()
        runner.cancel("stop", grace=5)
        self.assertEqual(self.kills.calls, [(runner.pid, signal.SIGTERM)])
        self.clock.advance(4.9)
        self.assertNoResult(runner.ended)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(runner.ended).ending, Ending.CANCELLED)
        self.assertIn((runner.pid, signal.SIGKILL), self.kills.calls)

    def test_cancel_with_grace_ends_early_when_the_child_obeys(self):
        runner = self.start()
        runner.cancel("stop", grace=5)
        exit_with(runner, signal=signal.SIGTERM)
        self.assertEqual(self.successResultOf(runner.ended).ending, Ending.CANCELLED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_leftover_holding_stdout_is_killed_after_the_drain_grace(self):
        runner = self.start()
        runner.processExited(Failure(error.ProcessDone(0)))
        self.assertNoResult(runner.ended)
        self.clock.advance(DRAIN_GRACE)
        self.assertEqual(self.successResultOf(runner.ended).exit_code, 0)
        self.assertIn((runner.pid, signal.SIGKILL), self.kills.calls)

    def test_output_after_the_end_is_ignored(self):
        runner = self.start(timeout=1)
        runner.childDataReceived(1, b"before")
        self.clock.advance(1)
        runner.childDataReceived(1, b"after")
        self.assertEqual(self.sink.text(), "before")

    def test_start_failure_carries_the_os_reason(self):
        self.spawn.fail_with = FileNotFoundError(2, "No such file or directory")
        runner = self.start(argv=("./gone",))
        outcome = self.successResultOf(runner.ended)
        self.assertEqual((outcome.ending, outcome.exit_code, outcome.started),
                         (Ending.START_FAILED, -1, False))
        self.assertEqual(outcome.error, "cannot start './gone': No such file or directory")


class GroupCleanup(SynchronousTestCase):
    """After the exit the group is SIGKILLed and verified empty; a kill that finds no
    process at all (not even a zombie) is the verification."""

    def setUp(self):
        self.clock = task.Clock()
        self.kills, self.asked = [], []

    def start(self, found_someone):
        def killpg(pgid, sig):
            self.kills.append((pgid, sig))
            return found_someone

        def group_alive(pgid):
            self.asked.append(pgid)
            return False
        return start_task(self.clock, ("cmd",), StdoutCollector(), spawn=FakeSpawner(),
                          killpg=killpg, group_alive=group_alive)

    def test_a_kill_that_finds_no_process_is_the_verification(self):
        runner = self.start(found_someone=False)
        exit_with(runner, 0)
        self.assertIs(self.successResultOf(runner.cleaned), True)
        self.assertEqual((self.kills, self.asked), ([(runner.pid, signal.SIGKILL)], []))

    def test_a_kill_that_finds_a_process_is_verified_by_asking_after_it(self):
        runner = self.start(found_someone=True)
        exit_with(runner, 0)
        self.assertIs(self.successResultOf(runner.cleaned), True)
        self.assertEqual(self.asked, [runner.pid])


def test_the_real_killpg_says_whether_the_group_had_a_process():
    from agent.runner.process import _killpg
    assert _killpg(os.getpgid(0), 0) is True
    child = os.posix_spawn("/bin/true", ["/bin/true"], {}, setpgroup=0)
    os.waitpid(child, 0)
    assert _killpg(child, 0) is False  # reaped: its group has no one left


class StartedLater(SynchronousTestCase):
    """A busy agent starts a child on its spawn thread: the runner learns its pid
    later, and what happens meanwhile waits for it (agent.runner.spawner)."""

    def setUp(self):
        self.clock = task.Clock()
        self.kills = KillRecorder()
        self.started = []
        self.runner = start_task(self.clock, ("cmd",), StdoutCollector(), timeout=5,
                                 spawn=lambda reactor, protocol, *a, **kw: self.started.append(
                                     protocol),
                                 killpg=self.kills, group_alive=self.kills.group_alive)

    def run_now(self, pid: int = 4321) -> None:
        from tests.fakes import FakeProcessTransport
        self.started[0].makeConnection(FakeProcessTransport(pid))

    def test_it_is_spawned_once_it_runs_and_its_timeout_counts_from_then(self):
        self.assertNoResult(self.runner.spawned)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.run_now()
        self.assertIs(self.successResultOf(self.runner.spawned), True)
        self.assertEqual(self.runner.pid, 4321)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(self.runner.ended).ending, Ending.TIMED_OUT)

    def test_a_cancel_meanwhile_kills_the_group_once_it_has_a_pid(self):
        self.runner.cancel("client disconnected")
        self.assertNoResult(self.runner.ended)
        self.assertEqual(self.kills.calls, [], "no group to kill yet")
        self.run_now()
        outcome = self.successResultOf(self.runner.ended)
        self.assertEqual((outcome.ending, outcome.error, outcome.pid),
                         (Ending.CANCELLED, "client disconnected", 4321))
        self.assertIn((4321, signal.SIGKILL), self.kills.calls)

    def test_a_graceful_cancel_meanwhile_terms_first(self):
        self.runner.cancel("stop", grace=2)
        self.run_now()
        self.assertEqual(self.kills.calls, [(4321, signal.SIGTERM)])
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(self.runner.ended).ending, Ending.CANCELLED)

    def test_a_start_that_fails_on_the_thread_is_a_start_failure(self):
        self.runner.cancel("too late to matter")
        self.started[0].start_failed(FileNotFoundError(2, "No such file or directory"))
        self.assertIs(self.successResultOf(self.runner.spawned), False)
        outcome = self.successResultOf(self.runner.ended)
        self.assertEqual((outcome.ending, outcome.error),
                         (Ending.START_FAILED, "cannot start 'cmd': No such file or directory"))
        self.assertIs(self.successResultOf(self.runner.cleaned), True)
        self.assertEqual((self.kills.calls, self.clock.getDelayedCalls()), ([], []))


# -- real children


def _run(argv, timeout=None, **kwargs):
    from twisted.internet import reactor
    sink = StdoutCollector()
    runner = start_task(reactor, argv, sink, timeout=timeout, **kwargs)
    return runner, sink


@pytest_twisted.ensureDeferred
async def test_child_leads_its_own_process_group():
    runner, sink = _run(["sh", "-c", "ps -o pgid= -p $$"])
    outcome = await runner.ended
    assert int(sink.text()) == outcome.pid != os.getpgid(0)


@pytest_twisted.ensureDeferred
async def test_exit_one_is_not_a_start_failure():
    runner, _ = _run(["sh", "-c", "exit 1"])
    outcome = await runner.ended
    assert (outcome.ending, outcome.exit_code, outcome.error, outcome.started) == (
        Ending.EXITED, 1, "", True)


@pytest.mark.parametrize("mode, reason", [(0o644, "Permission denied"),
                                          (0o755, "Exec format error")])
@pytest_twisted.ensureDeferred
async def test_unstartable_files_say_why(tmp_path, mode, reason):
    path = tmp_path / "prog"
    path.write_bytes(b"\x7fELF garbage")
    path.chmod(mode)
    runner, _ = _run([str(path)])
    outcome = await runner.ended
    assert outcome.ending is Ending.START_FAILED and reason in outcome.error


@pytest_twisted.ensureDeferred
async def test_stderr_is_not_output():
    runner, sink = _run(["sh", "-c", "echo out; echo err >&2"])
    await runner.ended
    assert sink.text() == "out\n" and sink.sizes[2] == 4


@pytest_twisted.ensureDeferred
async def test_children_do_not_inherit_ignored_sigpipe():
    runner, sink = _run(["grep", "SigIgn", "/proc/self/status"])  # Python would reset it itself
    await runner.ended
    ignored_mask = int(sink.text().split()[1], 16)
    assert not ignored_mask & (1 << (signal.SIGPIPE - 1))


class _Collected(ProcessProtocol):
    """A bare protocol for spawn_in_group: stdout, and the end."""

    def __init__(self):
        self.out = b""
        self.ended = Deferred()

    def outReceived(self, data):
        self.out += data

    def processEnded(self, reason):
        self.ended.callback(None)


@pytest.mark.parametrize("cwd", [None, "/"], ids=["posix_spawn", "fork"])
@pytest_twisted.ensureDeferred
async def test_a_child_may_lead_a_session_of_its_own(cwd):
    from twisted.internet import reactor
    protocol = _Collected()
    spawn_in_group(reactor, protocol, ["sh", "-c", "ps -o sid=,pgid= -p $$; echo $$"],
                   cwd=cwd, new_session=True)
    await protocol.ended
    sid, pgid, pid = map(int, protocol.out.split())
    assert sid == pgid == pid != os.getsid(0)


@pytest_twisted.ensureDeferred
async def test_a_child_may_start_with_signals_ignored_and_keep_them_past_exec():
    from twisted.internet import reactor
    protocol = _Collected()
    spawn_in_group(reactor, protocol, ["grep", "SigIgn", "/proc/self/status"],
                   ignore_signals=[signal.SIGTERM, signal.SIGHUP])
    await protocol.ended
    ignored_mask = int(protocol.out.split()[1], 16)
    assert ignored_mask & (1 << (signal.SIGTERM - 1)) and ignored_mask & (1 << (signal.SIGHUP - 1))
    assert not ignored_mask & (1 << (signal.SIGPIPE - 1)), "only those asked for"


@pytest_twisted.ensureDeferred
async def test_timeout_leaves_no_member_of_the_group():
    runner, sink = _run(["sh", "-c", "(sleep 60; echo late) & echo early; sleep 60"], timeout=0.3)
    outcome = await runner.ended
    assert (outcome.ending, sink.text()) == (Ending.TIMED_OUT, "early\n")
    assert not wait_until_empty(group_members, outcome.pid)


@pytest_twisted.ensureDeferred
async def test_background_leftover_is_killed_when_the_task_ends():
    runner, sink = _run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"])
    outcome = await runner.ended
    assert outcome.exit_code == 0
    assert not wait_until_empty(group_members, outcome.pid)


@pytest_twisted.ensureDeferred
async def test_cwd_task_resolves_relative_argv0_there(tmp_path):
    script = tmp_path / "hello"
    script.write_text("#!/bin/sh\necho from $(pwd)\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    runner, sink = _run(["./hello"], cwd=str(tmp_path))
    outcome = await runner.ended
    assert outcome.exit_code == 0 and sink.text() == f"from {tmp_path}\n"


@pytest_twisted.ensureDeferred
async def test_cwd_task_that_cannot_start_is_a_start_failure(tmp_path):
    runner, _ = _run(["./missing"], cwd=str(tmp_path))
    outcome = await runner.ended
    assert outcome.ending is Ending.START_FAILED and "No such file" in outcome.error


@pytest_twisted.ensureDeferred
async def test_cwd_task_also_leads_its_own_group(tmp_path):
    runner, sink = _run(["sh", "-c", "ps -o pgid= -p $$"], cwd=str(tmp_path))
    outcome = await runner.ended
    assert int(sink.text()) == outcome.pid


@pytest_twisted.ensureDeferred
async def test_environment_is_passed_as_given():
    runner, sink = _run([sys.executable, "-c", "import os; print(os.environ['ONLY'])"],
                        env={"ONLY": "this"})
    await runner.ended
    assert sink.text() == "this\n"


class OutputLimit(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.spawn = FakeSpawner()
        self.kills = KillRecorder()
        self.sink = StdoutCollector()
        self.runner = start_task(self.clock, ["cmd"], self.sink, output_limit=10,
                                 spawn=self.spawn, killpg=self.kills,
                           group_alive=self.kills.group_alive)

    def test_output_up_to_the_limit_is_fine(self):
        self.runner.childDataReceived(1, b"x" * 10)
        exit_with(self.runner, 0)
        self.assertEqual(self.successResultOf(self.runner.ended).exit_code, 0)

    def test_output_beyond_the_limit_kills_and_keeps_the_first_bytes(self):
        self.runner.childDataReceived(1, b"12345678")
        self.runner.childDataReceived(1, b"9abcdef")
        outcome = self.successResultOf(self.runner.ended)
        self.assertEqual((outcome.ending, outcome.exit_code, outcome.error),
                         (Ending.OUTPUT_LIMIT, -1, "output limit exceeded"))
        self.assertEqual(self.sink.text(), "123456789a")
        self.assertIn((self.runner.pid, signal.SIGKILL), self.kills.calls)

    def test_stderr_does_not_count(self):
        self.runner.childDataReceived(2, b"e" * 100)
        self.assertNoResult(self.runner.ended)


@pytest_twisted.ensureDeferred
async def test_cleanup_is_verified_after_a_timeout_with_grandchildren():
    runner, _ = _run(["sh", "-c", "sleep 60 & sleep 60 & wait"], timeout=0.2)
    outcome = await runner.ended
    assert outcome.ending is Ending.TIMED_OUT
    assert await runner.cleaned is True
    with pytest.raises(ProcessLookupError):
        os.killpg(outcome.pid, 0)


@pytest_twisted.ensureDeferred
async def test_limits_are_applied_in_the_child_before_exec():
    runner, sink = _run(["sh", "-c", "ulimit -n; ulimit -t; ulimit -v"],
                        limits=(("cpu_s", 7), ("memory_mb", 512), ("nofile", 33)))
    outcome = await runner.ended
    assert outcome.exit_code == 0
    assert sink.text().split() == ["33", "7", str(512 * 1024)]


@pytest_twisted.ensureDeferred
async def test_cpu_limit_stops_a_spinning_task():
    runner, _ = _run(["sh", "-c", "while :; do :; done"], limits=(("cpu_s", 1),), timeout=30)
    outcome = await runner.ended
    assert outcome.ending is Ending.SIGNALLED and "SIGXCPU" in outcome.error


@pytest_twisted.ensureDeferred
async def test_a_limit_that_cannot_be_applied_is_a_start_failure():
    with open("/proc/sys/fs/nr_open") as f:
        beyond_the_kernel_maximum = int(f.read()) + 1  # refused even to root
    runner, _ = _run(["true"], limits=(("nofile", beyond_the_kernel_maximum),))
    outcome = await runner.ended
    assert outcome.ending is Ending.START_FAILED and "not permitted" in outcome.error


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("memory_mb", [9_999_999_999_999, 1 << 44])
async def test_a_memory_limit_larger_than_the_kernel_takes_is_a_start_failure(memory_mb):
    """It used to fail in the child after the fork: 'ran, exit 1' (issue 15)."""
    runner, _ = _run(["true"], limits=(("memory_mb", memory_mb),))
    outcome = await runner.ended
    assert outcome.ending is Ending.START_FAILED, outcome
    assert "more than the kernel accepts" in outcome.error


@pytest_twisted.ensureDeferred
async def test_a_pipe_is_grown_only_once_its_writer_fills_it():
    """Quiet tasks keep Linux's 64 KiB pipe (pipe buffers count against the
    user's quota); a task that fills it gets the large one."""
    import fcntl

    from twisted.internet import reactor

    from agent.runner.child import DEFAULT_PIPE_SIZE, PIPE_SIZE

    sizes = {}
    for label, write in (("quiet", "print('x')"), ("loud", "sys.stdout.write('x' * (1 << 20))")):
        runner, sink = _run([sys.executable, "-c", f"import sys, time; {write}; sys.stdout.flush(); "
                                                   "time.sleep(0.5)"])
        for _ in range(200):
            if sink.sizes[1] >= (1 if label == "quiet" else 1 << 20):
                break
            await task.deferLater(reactor, 0.01)
        sizes[label] = fcntl.fcntl(runner.transport.pipes[1].fileno(), fcntl.F_GETPIPE_SZ)
        await runner.ended
    assert sizes == {"quiet": DEFAULT_PIPE_SIZE, "loud": PIPE_SIZE}


def test_a_group_left_only_with_the_agents_zombies_is_empty_once_they_are_reaped():
    """As a child subreaper the agent is the parent of what a task leaves in its
    group; a zombie is still a member until reaped, so the check reaps it."""
    from agent.runner.process import _group_alive
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.setpgid(0, 0)
        signal.pause()
        os._exit(0)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # the child got there first
    os.kill(pid, signal.SIGKILL)
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        os.sched_yield()  # until it is a zombie
    assert os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    assert _group_alive(pid) is False
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped by the check


def test_the_check_leaves_a_tasks_own_leader_to_twisted(monkeypatch):
    from twisted.internet import process as twisted_process

    from agent.runner.process import _group_alive
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.setpgid(0, 0)
        os._exit(3)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass
    monkeypatch.setitem(twisted_process.reapProcessHandlers, pid, object())
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        os.sched_yield()
    assert _group_alive(pid) is True, "the unreaped leader still counts"
    assert os.waitpid(pid, 0)[1] >> 8 == 3, "its status was left for Twisted"
