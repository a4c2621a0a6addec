"""The idempotency-key index: which task a request id was submitted as."""
from __future__ import annotations

from agent.history.keyindex import KeyIndex


def test_a_remembered_key_names_its_task_and_an_unknown_one_nothing():
    index = KeyIndex()
    index.remember("nightly-42", "a" * 32)
    assert index.task_for("nightly-42") == "a" * 32
    assert index.task_for("nightly-43") is None
    assert len(index) == 1


def test_when_loading_the_history_a_later_task_with_the_same_key_wins():
    index = KeyIndex()
    index.load(iter([("k", "old"), ("other", "t2"), ("k", "new")]))
    assert index.task_for("k") == "new"
    assert len(index) == 2


def test_forgetting_a_task_frees_its_key_but_not_a_newer_tasks():
    index = KeyIndex()
    index.load([("k", "old"), ("j", "t2")])
    index.remember("k", "new")
    index.forget(["old", "t2", "never-keyed"])
    assert index.task_for("k") == "new"
    assert index.task_for("j") is None


def test_a_failed_load_leaves_the_index_as_it_was():
    index = KeyIndex()
    index.remember("k", "t1")

    def broken():
        yield ("j", "t2")
        raise OSError("disk went away")

    try:
        index.load(broken())
    except OSError:
        pass
    else:
        raise AssertionError("the load's error was swallowed")
    assert index.task_for("j") is None
    assert index.task_for("k") == "t1"


def test_keys_are_exact_text_not_patterns():
    index = KeyIndex()
    index.remember("a%", "t1")
    index.remember("ä", "t2")
    assert index.task_for("ab") is None
    assert index.task_for("a%") == "t1"
    assert index.task_for("ä") == "t2"
    assert index.task_for("A%") is None
