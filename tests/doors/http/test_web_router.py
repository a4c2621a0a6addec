"""Routing, auth refusals and error mapping, driven in memory through treq's StubTreq."""
from __future__ import annotations

import pytest
from treq.testing import StubTreq

from agent.doors.http.auth import NoToken, TokenAuth, load_or_create_token
from agent.doors.http.errors import Conflict
from agent.doors.http.router import Response, Route, Router

TOKEN = "s3cret"


def boom(request):
    raise RuntimeError("secret internals")


def conflict(request, id):
    raise Conflict(f"task {id} is in the way")


@pytest.fixture
def stub():
    router = Router([Route("GET", "/healthz", lambda r: Response(200, {"status": "ok"}), scope=None),
                     Route("GET", "/boom", boom),
                     Route("POST", "/things/{id}/poke", conflict),
                     Route("GET", "/things/{id}", lambda r, id: Response(200, {"id": id})),
                     Route("GET", "/odd", lambda r: Response(200, {"text": "\ud800"})),
                     Route("GET", "/broken-headers",
                           lambda r: Response(200, {"ok": 1}, {b"X-Bad": object()}))],
                    TokenAuth({}).with_admin(TOKEN))
    return StubTreq(router)


def _auth(token=TOKEN):
    return {b"Authorization": [b"Bearer " + token.encode()]}


def _result(stub, d):
    results = []
    d.addCallback(results.append)
    stub.flush()
    return results[0]


def _call(stub, method, path, headers=None):
    response = _result(stub, stub.request(method, "http://agent" + path, headers=headers or {}))
    body = _result(stub, response.json())
    return response, body


def test_path_parameters_reach_the_handler(stub):
    response, body = _call(stub, "GET", "/things/abc", _auth())
    assert (response.code, body) == (200, {"id": "abc"})


def test_a_parameter_is_percent_decoded_after_the_path_is_split(stub):
    response, body = _call(stub, "GET", "/things/a%2Fpoke%20%C3%BC", _auth())
    assert (response.code, body) == (200, {"id": "a/poke \u00fc"})


def test_unknown_path_is_a_json_404(stub):
    response, body = _call(stub, "GET", "/nope", _auth())
    assert response.code == 404 and "no such endpoint" in body["error"]


def test_wrong_method_is_405_with_allow(stub):
    response, body = _call(stub, "DELETE", "/things/abc", _auth())
    assert response.code == 405
    assert response.headers.getRawHeaders("Allow") == ["GET"]


def test_missing_token_is_401_with_a_bearer_challenge(stub):
    response, body = _call(stub, "GET", "/things/abc")
    assert response.code == 401
    assert response.headers.getRawHeaders("WWW-Authenticate") == ['Bearer realm="agent"']


def test_wrong_token_is_401_invalid_token(stub):
    response, body = _call(stub, "GET", "/things/abc", _auth("s3cre"))
    assert response.code == 401
    assert 'error="invalid_token"' in response.headers.getRawHeaders("WWW-Authenticate")[0]


def test_auth_is_checked_before_the_handler_runs(stub):
    response, body = _call(stub, "POST", "/things/abc/poke", _auth("wrong"))
    assert response.code == 401


def test_typed_errors_map_to_their_status(stub):
    response, body = _call(stub, "POST", "/things/abc/poke", _auth())
    assert (response.code, body) == (409, {"error": "task abc is in the way"})


def test_an_unexpected_error_is_a_500_without_a_traceback(stub):
    response, body = _call(stub, "GET", "/boom", _auth())
    assert response.code == 500
    assert "secret internals" not in repr(body) and "Traceback" not in repr(body)


def test_open_routes_need_no_token(stub):
    response, body = _call(stub, "GET", "/healthz")
    assert (response.code, body) == (200, {"status": "ok"})


def test_a_new_token_file_is_private_and_reused(tmp_path):
    path = tmp_path / "token"
    token = load_or_create_token(path)
    assert len(token) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_token(path) == token


def test_an_empty_token_file_refuses_to_start(tmp_path):
    (tmp_path / "token").write_text("\n")
    with pytest.raises(NoToken):
        load_or_create_token(tmp_path / "token")


@pytest.mark.parametrize("method, path", [("GET", "/nope"), ("DELETE", "/things/abc"),
                                          ("GET", "/healthz/x"), ("POST", "/things/abc")])
def test_without_a_token_every_path_but_the_open_ones_is_401_before_any_lookup(stub, method, path):
    """No 404/405 map of the API for whoever has no token."""
    response, body = _call(stub, method, path)
    assert response.code == 401


@pytest.mark.parametrize("method", ["POST", "DELETE", "TRACE"])
def test_another_method_on_an_open_path_is_405_without_a_token(stub, method):
    """/healthz is public, so are its methods: a wrong one is what HTTP says it is."""
    response, body = _call(stub, method, "/healthz")
    assert response.code == 405 and "not allowed" in body["error"]
    assert response.headers.getRawHeaders("Allow") == ["GET"]


def test_the_server_header_names_no_version(stub):
    for headers in ({}, _auth()):
        response, _ = _call(stub, "GET", "/healthz", headers)
        assert response.headers.getRawHeaders("Server") == ["agent"]


def test_text_that_cannot_be_encoded_is_sent_escaped_never_a_hang(stub):
    response, body = _call(stub, "GET", "/odd", _auth())
    assert (response.code, body) == (200, {"text": "\ud800"})


def test_an_answer_that_cannot_be_written_ends_as_a_json_500(stub):
    response, body = _call(stub, "GET", "/broken-headers", _auth())
    assert response.code == 500 and "internal error" in body["error"]
