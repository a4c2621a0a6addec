"""Server-sent events as agentctl reads them: the agent's output events, and a cut-off stream."""
from __future__ import annotations

from agent.clients.sse import Event, EventParser, events

AGENT_STREAM = [
    b"id: stdout:15,stderr:10\n", b"event: stdout\n", b'data: {"text": "tick\\n", "next": 15}\n',
    b"\n",
    b"id: stdout:15,stderr:15\n", b"event: stderr\n", b'data: {"text": "tock\\n", "next": 15}\n',
    b"\n",
]


def test_each_event_of_the_agent_comes_with_its_name_data_and_id():
    assert events(AGENT_STREAM) == [
        Event("stdout", '{"text": "tick\\n", "next": 15}', "stdout:15,stderr:10"),
        Event("stderr", '{"text": "tock\\n", "next": 15}', "stdout:15,stderr:15"),
    ]


def test_an_event_is_given_only_at_the_blank_line_that_ends_it():
    parser = EventParser()
    assert [parser.feed(line) for line in AGENT_STREAM[:3]] == [None, None, None]
    assert parser.feed(b"\n").name == "stdout"


def test_an_event_cut_off_by_a_dropped_connection_is_never_given():
    assert events(AGENT_STREAM[:7]) == events(AGENT_STREAM[:4])


def test_several_data_lines_are_joined_by_newlines():
    assert events([b"event: end\n", b"data: one\n", b"data: two\n", b"\n"]) == [
        Event("end", "one\ntwo")]


def test_crlf_line_ends_comments_and_unknown_fields_are_read_as_the_format_says():
    lines = [": a comment\r\n", "retry: 100\r\n", "event: end\r\n", "data:{}\r\n", "\r\n"]
    assert events(lines) == [Event("end", "{}")]


def test_an_event_without_a_name_is_a_message_and_blank_lines_alone_are_nothing():
    assert events(["\n", "\n", "data: x\n", "\n"]) == [Event("message", "x")]


def test_bytes_that_are_not_utf8_are_replaced_not_fatal():
    assert events([b"event: stdout\n", b"data: \xff\n", b"\n"]) == [Event("stdout", "\ufffd")]
