"""Scoped tokens, token files refused as ssh refuses keys, and who launched each task (issue 15)."""
from __future__ import annotations

import hashlib
import json
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.python import usage

from agent.doors.http.auth import NoToken, TokenAuth, read_token, read_tokens_file, require
from agent.doors.http.errors import Forbidden
from agent.options import Options
from tests.webapi import TOKEN, make_api  # noqa: F401

CI = "ci-token-ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
VIEWER = "viewer-token-abcdefghijklmnopqrstuvwxyz0123"
OPS = "ops-token-0123456789-0123456789-0123456789"


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _tokens_file(tmp_path, text=None, mode=0o600):
    path = tmp_path / "tokens.toml"
    path.write_text(text if text is not None else f"""
[tokens.ci]
sha256 = "{_sha(CI)}"
scopes = ["run"]

[tokens.viewer]
sha256 = "{_sha(VIEWER)}"
scopes = ["read"]

[tokens.ops]
sha256 = "{_sha(OPS)}"
scopes = ["read", "cancel", "purge"]
""")
    path.chmod(mode)
    return path


# -- the files

def test_a_tokens_file_gives_each_token_its_name_and_scopes(tmp_path):
    principals = read_tokens_file(_tokens_file(tmp_path))
    by_name = {p.name: p for p in principals.values()}
    assert by_name["ci"].scopes == {"run"} and by_name["ops"].allows("purge")
    assert not by_name["viewer"].allows("run")


@pytest.mark.parametrize("text, message", [
    ("[tokens.x]\nsha256 = 'abc'\nscopes = ['read']\n", "64 hex digits"),
    (f"[tokens.x]\nsha256 = '{'a' * 64}'\nscopes = ['root']\n", "scopes must be"),
    (f"[tokens.x]\nsha256 = '{'a' * 64}'\nscopes = []\n", "scopes must be"),
    (f"[tokens.x]\nsha256 = '{'a' * 64}'\nscopes = ['read']\ntoken = 'plain'\n", "sha256 and scopes only"),
    ("[users.x]\n", "unknown: users"),
    ("not toml = = =", "not valid TOML"),
    (f"[tokens.a]\nsha256 = '{'a' * 64}'\nscopes = ['read']\n"
     f"[tokens.b]\nsha256 = '{'a' * 64}'\nscopes = ['run']\n", "are the same"),
])
def test_a_malformed_tokens_file_is_refused_naming_the_fault(tmp_path, text, message):
    with pytest.raises(NoToken, match=message):
        read_tokens_file(_tokens_file(tmp_path, text))


def test_token_files_others_can_read_are_refused_with_the_fix(tmp_path):
    with pytest.raises(NoToken, match="chmod 600"):
        read_tokens_file(_tokens_file(tmp_path, mode=0o640))
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o644)
    with pytest.raises(NoToken, match="chmod 600"):
        read_token(token)


def test_a_short_token_is_refused_with_how_to_make_one(tmp_path):
    token = tmp_path / "token"
    token.write_text("hunter2")
    token.chmod(0o600)
    with pytest.raises(NoToken, match="at least 32"):
        read_token(token)


def test_the_agent_refuses_to_start_on_a_bad_token_file(tmp_path):
    token = tmp_path / "token"
    token.write_text("short")
    token.chmod(0o600)
    with pytest.raises(usage.UsageError, match="at least 32"):
        Options().parseOptions(["--token-file", str(token), "--data-dir", str(tmp_path)])


def test_the_scope_check_names_the_missing_scope(tmp_path):
    auth = TokenAuth(read_tokens_file(_tokens_file(tmp_path)))

    class Request:
        def getHeader(self, name):
            return b"Bearer " + VIEWER.encode()
    viewer = auth(Request())
    require(viewer, "read")
    with pytest.raises(Forbidden, match="lacks the scope 'run'"):
        require(viewer, "run")


# -- the API with scoped tokens

@pytest.fixture
def scoped(make_api, tmp_path):
    return make_api(args=["--tokens-file", str(_tokens_file(tmp_path))])


@pytest_twisted.ensureDeferred
async def test_each_endpoint_asks_for_its_scope(scoped):
    refused = await scoped.json("POST", "/tasks", {"command": "true"}, expect=403, token=VIEWER)
    assert "'run'" in refused["error"]
    started = await scoped.json("POST", "/tasks", {"command": "sleep", "args": ["30"]},
                                expect=201, token=CI)
    await scoped.json("GET", f"/tasks/{started['id']}", expect=403, token=CI)
    await scoped.json("GET", f"/tasks/{started['id']}", token=VIEWER)
    await scoped.json("POST", f"/tasks/{started['id']}/cancel", expect=403, token=VIEWER)
    await scoped.json("POST", f"/tasks/{started['id']}/cancel", token=OPS)
    refused = await scoped.json("DELETE", f"/tasks/{started['id']}?purge=true", expect=403,
                                token=CI)
    assert "'cancel'" in refused["error"]
    await scoped.json("DELETE", f"/tasks/{started['id']}?purge=true", token=OPS)


@pytest_twisted.ensureDeferred
async def test_without_a_tokens_file_nothing_but_the_admin_token_is_known(scoped):
    """--tokens-file alone: no admin token file is made or read."""
    await scoped.json("GET", "/tasks", expect=401)  # TOKEN, the fixture's admin token
    await scoped.json("GET", "/tasks", token=VIEWER)


@pytest_twisted.ensureDeferred
async def test_a_task_records_the_token_that_launched_it(scoped):
    started = await scoped.json("POST", "/tasks", {"command": "true"}, expect=201, token=CI)
    record = await scoped.json("GET", f"/tasks/{started['id']}", token=VIEWER)
    assert record["launched_by"] == "token:ci"


@pytest_twisted.ensureDeferred
async def test_a_run_only_token_gets_its_own_replays_but_not_anothers(make_api, tmp_path):
    other = "other-runner-token-0123456789abcdefghij"
    path = _tokens_file(tmp_path, f"""
[tokens.ci]
sha256 = "{_sha(CI)}"
scopes = ["run"]

[tokens.other]
sha256 = "{_sha(other)}"
scopes = ["run"]
""")
    api = make_api(args=["--tokens-file", str(path)])
    key = {"Idempotency-Key": "deploy-9"}
    first = await api.json("POST", "/tasks", {"command": "echo", "args": ["secret"]},
                           expect=201, token=CI, headers=key)
    again = await api.json("POST", "/tasks", {"command": "echo", "args": ["secret"]},
                           expect=200, token=CI, headers=key)
    assert again["id"] == first["id"]
    refused = await api.json("POST", "/tasks", {"command": "echo", "args": ["secret"]},
                             expect=403, token=other, headers=key)
    assert "secret" not in json.dumps(refused) and first["id"] not in json.dumps(refused)


@pytest_twisted.ensureDeferred
async def test_a_tcp_task_records_its_peer_as_who_launched_it(make_api):
    from agent.core.lanes import Lane
    from agent.doors.tcp.protocol import TaskLineFactory
    api = make_api()
    port = reactor.listenTCP(0, TaskLineFactory(api.engine, Lane(1), clock=reactor),
                             interface="127.0.0.1")
    try:
        def blocking():
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as s:
                s.sendall(b'{"command": ["true"]}\n')
                s.makefile("rb").readline()
                return s.getsockname()[1]
        client_port = await deferToThread(blocking)
    finally:
        await port.stopListening()
    newest = (await api.json("GET", "/tasks?limit=1"))["tasks"][0]
    assert newest["launched_by"] == f"tcp:127.0.0.1:{client_port}"


@pytest_twisted.ensureDeferred
async def test_a_command_off_the_allow_list_is_403_and_one_on_it_runs(make_api, tmp_path):
    import shutil
    allow = tmp_path / "allow.toml"
    allow.write_text(f'[[allow]]\nprogram = "{shutil.which("echo")}"\n')
    api = make_api(args=["--allow-file", str(allow)])
    refused = await api.json("POST", "/tasks", {"command": "touch", "args": [str(tmp_path / "x")]},
                             expect=403)
    assert refused["error"].startswith("command not allowed: ")
    assert not (tmp_path / "x").exists()
    response = await api.request("POST", "/run", {"command": "echo", "args": ["allowed"]})
    assert (response.code, await response.text()) == (200, "allowed\n")


@pytest_twisted.ensureDeferred
async def test_new_tasks_are_507_while_running_tasks_output_alone_fills_keep_bytes(make_api):
    from tests.webapi import eventually
    api = make_api(args=["--keep-bytes", "100000"])
    big = await api.start("sh", "-c", "head -c 200000 /dev/zero; exec sleep 30")
    await eventually(lambda: api.json("GET", f"/tasks/{big['id']}"),
                     lambda record: record["stdout_bytes"] >= 200_000)
    refused = await api.request("POST", "/tasks", {"command": "true"})
    assert refused.code == 507 and refused.headers.getRawHeaders("Retry-After") == ["5"]
    assert "--keep-bytes" in (await refused.json())["error"]
    await api.json("POST", f"/tasks/{big['id']}/cancel")
    await api.json("POST", "/tasks", {"command": "true"}, expect=201)
