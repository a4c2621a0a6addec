"""A blocking client of the agent's HTTP API (docs/http-api.md) on urllib: what agentctl speaks.

Standard library only, so the command-line client starts fast and needs nothing
but the interpreter. Every failure becomes a ClientError whose text is one line
an operator can act on: no answer (Unreachable) or an error answer (Refused).
The token is read only when a request needs one, so `agentctl health` works
without it.
"""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TOKEN_FILE = "./agent-data/token"
REQUEST_TIMEOUT = 30.0
"""Seconds to wait for an answer (or, while following output, for the next byte)."""


class ClientError(Exception):
    """Something agentctl could not do; str() is one line for the operator."""


class Unreachable(ClientError):
    """No answer, or one cut short: the agent is down, the network failed, a timeout passed."""


class Refused(ClientError):
    """The agent answered with an error status; message is its `error`."""

    def __init__(self, status: int, message: str, hint: str = ""):
        super().__init__(f"{message} (HTTP {status}){hint}")
        self.status = status
        self.message = message


def read_token(path: str) -> str:
    """The first line of the token file, stripped."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as e:
        raise ClientError(f"cannot read the token file {path}: {e.strerror or e} "
                          "(name it with --token-file or AGENT_TOKEN_FILE)") from None
    except UnicodeDecodeError:
        raise ClientError(f"the token file {path} is not text") from None
    if not token:
        raise ClientError(f"the token file {path} holds no token on its first line")
    return token


def check_url(url: str) -> str:
    """The agent's base URL without a trailing slash; ClientError unless http(s)://HOST[:PORT]."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ClientError(f"--url must look like http://HOST:PORT, not {url!r}")
    return url.rstrip("/")


def tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """For an https:// agent: trust --ca (else the system's CAs), show --cert/--key (an mtls:
    door asks for a client certificate its CA signed); None when no option is given."""
    if ca is None and cert is None and key is None:
        return None
    if key is not None and cert is None:
        raise ClientError("--key needs --cert: the certificate the key belongs to")
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ClientError(f"cannot load the TLS files: {_why(e)}") from None
    return context


class AgentApi:
    def __init__(self, url: str, token_file: str, tls: ssl.SSLContext | None = None):
        self.url = check_url(url)
        if tls is not None and not self.url.startswith("https://"):
            raise ClientError("--ca, --cert and --key need an https:// --url")
        self.token_file = token_file
        self._token: str | None = None
        self._tls = tls

    def call(self, method: str, path: str | tuple[str, ...], query: dict | None = None,
             body: dict | None = None, auth: bool = True,
             timeout: float = REQUEST_TIMEOUT) -> dict:
        """One request; its JSON answer. path: "/tasks/ID", or its segments ("fleet", "tasks",
        KEY), each percent-encoded whole (a key may hold a slash)."""
        with self.open(method, path, query, body, auth, timeout) as response:
            try:
                data = response.read()
            except (OSError, http.client.HTTPException) as e:
                raise Unreachable(f"the answer from {self.url} was cut short: {_why(e)}") from None
        try:
            answer = json.loads(data)
        except ValueError:
            raise ClientError(f"{self.url}{encoded(path)} did not answer JSON; is --url the "
                              "agent?") from None
        if not isinstance(answer, dict):
            raise ClientError(f"{self.url}{encoded(path)} answered JSON that is not an object")
        return answer

    def open(self, method: str, path: str | tuple[str, ...], query: dict | None = None,
             body: dict | None = None, auth: bool = True, timeout: float = REQUEST_TIMEOUT,
             accept: str = "application/json"):
        """The response, its body unread (a stream's lines come as they are written)."""
        url = self.url + encoded(path)
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": accept}
        if auth:
            headers["Authorization"] = f"Bearer {self._bearer()}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data, headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=timeout, context=self._tls)
        except urllib.error.HTTPError as e:
            raise self._refusal(e) from None
        except urllib.error.URLError as e:
            raise Unreachable(f"cannot reach the agent at {self.url}: {_why(e.reason)}"
                              f"{_where_hint(e.reason)}") from None
        except (OSError, http.client.HTTPException) as e:
            raise Unreachable(f"no answer from the agent at {self.url}: {_why(e)}") from None

    def _bearer(self) -> str:
        if self._token is None:
            self._token = read_token(self.token_file)
        return self._token

    def _refusal(self, e: urllib.error.HTTPError) -> Refused:
        try:
            with e:
                message = json.loads(e.read())["error"]
        except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException):
            message = e.reason or "error"
        message = " ".join(str(message).split())  # one line, whatever the agent sent
        hint = ""
        if e.code == 401:
            hint = (f"; is the token in {self.token_file} this agent's? "
                    "(--token-file or AGENT_TOKEN_FILE)")
        return Refused(e.code, message, hint)


def encoded(path: str | tuple[str, ...]) -> str:
    """A path as it goes on the wire: a string quoted (its slashes kept), or segments each
    quoted whole, '.' and '..' included (a client would take them for path steps)."""
    if isinstance(path, str):
        return urllib.parse.quote(path)
    return "".join("/" + (urllib.parse.quote(segment, safe="") if segment not in (".", "..")
                          else segment.replace(".", "%2E")) for segment in path)


def _why(error) -> str:
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _where_hint(reason) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return " (is it running? `make run` serves 127.0.0.1:8080; else --url or AGENT_URL)"
    return ""
