"""Spool files: every byte on disk as it arrives, the newest kept past the limit, readable from any offset."""
from __future__ import annotations

import os

from hypothesis import given, settings, strategies as st

from agent.history.spool import StreamReader, TaskOutput, segment_starts, size_on_disk


def read_all(reader: StreamReader, chunk: int = 7) -> bytes:
    parts = []
    while data := reader.read(chunk):
        parts.append(data)
    return b"".join(parts)


def test_silent_task_creates_no_files(tmp_path):
    output = TaskOutput(tmp_path / "t", limit=100)
    output.end()
    assert not (tmp_path / "t").exists()
    assert output.size(1) == (0, 0)


def test_a_limit_of_zero_counts_and_keeps_nothing(tmp_path):
    output = TaskOutput(tmp_path / "t", limit=0)
    output.received(1, b"counted")
    assert output.size(1) == (7, 7)
    assert not (tmp_path / "t").exists()
    assert read_all(StreamReader(tmp_path / "t", 1, live=output)) == b""


def test_streams_are_kept_apart(tmp_path):
    output = TaskOutput(tmp_path / "t", limit=100)
    output.received(1, b"out\n")
    output.received(2, b"err\n")
    output.received(1, b"more\n")
    output.end()
    assert read_all(StreamReader(tmp_path / "t", 1)) == b"out\nmore\n"
    assert read_all(StreamReader(tmp_path / "t", 2)) == b"err\n"
    assert output.size(1) == (9, 0)


def test_bytes_are_on_disk_before_the_task_ends(tmp_path):
    output = TaskOutput(tmp_path / "t", limit=100)
    output.received(1, b"early")
    assert read_all(StreamReader(tmp_path / "t", 1, live=output)) == b"early"


def test_past_the_limit_the_newest_bytes_are_kept_and_the_rest_counted(tmp_path):
    output = TaskOutput(tmp_path / "t", limit=80)
    data = bytes(range(256)) * 4
    for i in range(0, len(data), 13):
        output.received(1, data[i:i + 13])
    total, dropped = output.size(1)
    kept = read_all(StreamReader(tmp_path / "t", 1))
    assert total == len(data)
    assert 70 <= len(kept) <= 80, "at most the limit, at least the limit less one segment"
    assert kept == data[dropped:]
    assert size_on_disk(tmp_path / "t", 1) == (total, dropped)


def test_one_chunk_larger_than_the_limit_keeps_its_tail(tmp_path):
    output = TaskOutput(tmp_path / "t", limit=16)
    output.received(1, b"a" * 5)
    output.received(1, b"0123456789" * 5)
    assert read_all(StreamReader(tmp_path / "t", 1)) == (b"0123456789" * 5)[-16:]
    assert output.size(1) == (55, 39)


def test_reader_resumes_from_an_offset(tmp_path):
    output = TaskOutput(tmp_path / "t", limit=1000)
    output.received(1, b"0123456789")
    assert read_all(StreamReader(tmp_path / "t", 1, offset=4)) == b"456789"


def test_a_reader_at_the_largest_offset_reads_nothing(tmp_path):
    """A client may ask for any offset up to 2^63-1; a read reaching past it is no EINVAL."""
    output = TaskOutput(tmp_path / "t", limit=1000)
    output.received(1, b"0123456789")
    for offset in ((1 << 63) - 2, (1 << 63) - 1):
        for live in (None, output):
            assert StreamReader(tmp_path / "t", 1, offset=offset, live=live).read(65536) == b""


def test_reader_behind_the_dropped_bytes_jumps_ahead_and_counts_the_gap(tmp_path):
    output = TaskOutput(tmp_path / "t", limit=16)
    output.received(1, b"x" * 40)
    reader = StreamReader(tmp_path / "t", 1, offset=0)
    assert read_all(reader) == b"x" * 16
    assert reader.skipped == 24 and reader.position == 40


def test_live_reader_sees_new_bytes_and_new_segments(tmp_path):
    output = TaskOutput(tmp_path / "t", limit=64)  # segments of 8 bytes
    reader = StreamReader(tmp_path / "t", 1, live=output)
    assert reader.read(100) == b""
    seen = b""
    for i in range(20):
        output.received(1, b"%02d-" % i)
        seen += read_all(reader)
    assert seen == b"".join(b"%02d-" % i for i in range(20))
    assert reader.skipped == 0
    reader.close()


def test_a_reader_overtaken_by_deletion_continues_with_what_is_kept(tmp_path):
    output = TaskOutput(tmp_path / "t", limit=16)  # segments of 2 bytes
    output.received(1, b"ab")
    reader = StreamReader(tmp_path / "t", 1, live=output)
    assert reader.read(1) == b"a"
    for _ in range(20):
        output.received(1, b"cd")
    rest = read_all(reader)
    assert rest.endswith(b"cdcd") and reader.skipped > 0
    assert reader.position == 42


def test_watchers_hear_each_chunk_and_the_end_once(tmp_path):
    heard = []

    class Watcher:
        def output_arrived(self, fd):
            heard.append(fd)

        def output_ended(self):
            heard.append("end")

    output = TaskOutput(tmp_path / "t", limit=100)
    output.watch(Watcher())
    output.received(2, b"e")
    output.received(1, b"o")
    output.end()
    output.end()
    assert heard == [2, 1, "end"]


def test_a_full_disk_stops_spooling_but_keeps_counting(tmp_path):
    blocker = tmp_path / "t"
    blocker.write_text("a file where the directory should be")
    output = TaskOutput(blocker, limit=100)
    output.received(1, b"lost")
    output.received(1, b"bytes")
    assert output.size(1)[0] == 9
    assert output.streams[1].broken


@settings(max_examples=60, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=30),
       limit=st.integers(min_value=1, max_value=120))
def test_kept_bytes_are_always_the_newest_and_within_the_limit(tmp_path_factory, chunks, limit):
    directory = tmp_path_factory.mktemp("spool")
    output = TaskOutput(directory, limit=limit)
    for chunk in chunks:
        output.received(1, chunk)
    output.end()
    data = b"".join(chunks)
    total, dropped = output.size(1)
    kept = read_all(StreamReader(directory, 1), chunk=11)
    assert total == len(data)
    assert kept == data[dropped:]
    assert len(kept) <= limit
    assert len(segment_starts(directory, "stdout")) <= 9


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.one_of(st.binary(min_size=1, max_size=30), st.integers(1, 25)), max_size=40),
       limit=st.integers(min_value=1, max_value=60))
def test_a_live_reader_only_ever_returns_bytes_at_their_true_offsets(tmp_path_factory, steps, limit):
    directory = tmp_path_factory.mktemp("spool")
    output = TaskOutput(directory, limit=limit)
    reader = StreamReader(directory, 1, live=output)
    written = b""
    for step in steps:
        if isinstance(step, bytes):
            output.received(1, step)
            written += step
        else:
            chunk = reader.read(step)
            assert chunk == written[reader.position - len(chunk):reader.position]
    output.end()
    while chunk := reader.read(7):
        assert chunk == written[reader.position - len(chunk):reader.position]
    assert reader.position == len(written)
    reader.close()


def test_a_segment_refused_during_the_spawn_thread_s_limit_hold_is_opened_once_it_ends(
        tmp_path, monkeypatch):
    """EMFILE while the agent's raised limit is held at the original for a spawn: the
    spool tries once more after the hold instead of giving up on the task's output."""
    import errno

    from agent import fdlimit
    from agent.history import spool
    monkeypatch.setattr(fdlimit, "_original", (1024, 4096))
    real_open, refused = os.open, []

    def open_once_refused(path, *args):
        if not refused:
            refused.append(path)
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args)
    monkeypatch.setattr(spool.os, "open", open_once_refused)
    output = TaskOutput(tmp_path / "t", limit=100)
    output.received(1, b"kept\n")
    monkeypatch.setattr(spool.os, "open", real_open)
    output.end()
    assert refused and output.size(1) == (5, 0)
    assert (tmp_path / "t" / "stdout.0").read_bytes() == b"kept\n"
