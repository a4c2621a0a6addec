"""The open-file limit is raised to the hard limit, within fs.nr_open, and only upward."""
from __future__ import annotations

import errno
import resource
import threading

import pytest

from agent import fdlimit


class FakeLimits:
    def __init__(self, soft, hard, refuse=False):
        self.limits = (soft, hard)
        self.refuse = refuse

    def getrlimit(self, which):
        assert which == resource.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which, limits):
        if self.refuse:
            raise ValueError("not allowed to raise maximum limit")
        self.limits = limits


@pytest.fixture
def limits(monkeypatch, tmp_path):
    def make(soft, hard, nr_open=1048576, refuse=False):
        fake = FakeLimits(soft, hard, refuse)
        for name in ("getrlimit", "setrlimit"):
            monkeypatch.setattr(fdlimit.resource, name, getattr(fake, name))
        path = tmp_path / "nr_open"
        path.write_text(f"{nr_open}\n")
        return fake, str(path)
    yield make
    fdlimit.forget_raise()


def test_the_soft_limit_is_raised_to_the_hard_one_and_children_get_the_old_one(limits):
    fake, nr_open = limits(1024, 524288)
    assert fdlimit.raise_open_file_limit(nr_open) == (1024, 524288)
    assert fake.limits == (524288, 524288)
    assert fdlimit.children_limit() == (1024, 524288)


def test_an_unlimited_hard_limit_is_capped_at_nr_open(limits):
    fake, nr_open = limits(1024, resource.RLIM_INFINITY, nr_open=65536)
    assert fdlimit.raise_open_file_limit(nr_open) == (1024, 65536)
    assert fake.limits == (65536, resource.RLIM_INFINITY)


def test_nothing_changes_when_already_at_the_top(limits):
    fake, nr_open = limits(524288, 524288)
    assert fdlimit.raise_open_file_limit(nr_open) is None
    assert fdlimit.children_limit() is None


def test_a_refused_raise_is_logged_and_changes_nothing(limits):
    fake, nr_open = limits(1024, 4096, refuse=True)
    assert fdlimit.raise_open_file_limit(nr_open) is None
    assert fake.limits == (1024, 4096)
    assert fdlimit.children_limit() is None


def test_a_spawn_with_few_descriptors_open_holds_the_original_limit_only_while_it_runs(limits):
    fake, nr_open = limits(1024, 524288)
    fdlimit.raise_open_file_limit(nr_open)
    with fdlimit.original_limit_held(highest_fd=40) as inherited:
        assert inherited
        assert fake.limits == (1024, 524288)  # what posix_spawn copies into the child
    assert fake.limits == (524288, 524288)


def test_the_limit_is_given_back_even_when_the_spawn_fails(limits):
    fake, nr_open = limits(1024, 524288)
    fdlimit.raise_open_file_limit(nr_open)
    with pytest.raises(FileNotFoundError):
        with fdlimit.original_limit_held(highest_fd=40):
            raise FileNotFoundError("no-such-program")
    assert fake.limits == (524288, 524288)


def test_a_spawn_near_the_original_limit_leaves_the_agents_alone(limits):
    """Lowering it then would refuse the spawn's own descriptors (and the store
    thread's next open), so the caller must set the child's limit from outside."""
    fake, nr_open = limits(1024, 524288)
    fdlimit.raise_open_file_limit(nr_open)
    with fdlimit.original_limit_held(highest_fd=1024 - fdlimit.SPARE_DESCRIPTORS) as inherited:
        assert not inherited
        assert fake.limits == (524288, 524288)


def test_without_a_raise_the_child_inherits_the_agents_own_limit(limits):
    fake, nr_open = limits(524288, 524288)
    fdlimit.raise_open_file_limit(nr_open)
    with fdlimit.original_limit_held(highest_fd=100000) as inherited:
        assert inherited
        assert fake.limits == (524288, 524288)


def _emfile():
    return OSError(errno.EMFILE, "Too many open files")


def test_a_descriptor_refused_during_a_spawn_thread_s_hold_is_made_once_the_hold_ends(limits):
    """The reactor making a task's pipes while the spawn thread holds the limit at the
    original: EMFILE though the agent has room. It waits for the hold and tries again."""
    fake, nr_open = limits(1024, 524288)
    fdlimit.raise_open_file_limit(nr_open)
    attempts, holding, release = [], threading.Event(), threading.Event()

    def spawn_thread():
        with fdlimit.original_limit_held(highest_fd=40):
            holding.set()
            release.wait(10)
    thread = threading.Thread(target=spawn_thread)
    thread.start()
    holding.wait(10)

    def make():
        attempts.append(fake.limits)
        if len(attempts) == 1:
            release.set()  # the hold ends while the retry waits for it
            raise _emfile()
        return "pipe"
    assert fdlimit.made_despite_a_hold(make) == "pipe"
    thread.join(10)
    assert attempts == [(1024, 524288), (524288, 524288)]


def test_without_a_raise_or_for_another_error_a_refusal_is_the_caller_s(limits):
    fake, nr_open = limits(524288, 524288)
    fdlimit.raise_open_file_limit(nr_open)  # already at the top: never held

    def refused():
        raise _emfile()
    with pytest.raises(OSError) as raised:
        fdlimit.made_despite_a_hold(refused)
    assert raised.value.errno == errno.EMFILE
    fdlimit.forget_raise()
    fake, nr_open = limits(1024, 524288)
    fdlimit.raise_open_file_limit(nr_open)
    calls = []

    def failing():
        calls.append(1)
        raise OSError(errno.ENFILE, "file table overflow")
    with pytest.raises(OSError):
        fdlimit.made_despite_a_hold(failing)
    assert calls == [1]
