"""The agent as `pip install .` gives it: the wheel built from this checkout, in a
fresh virtualenv that cannot see the checkout, runs a task through each door.
And the development install (`make install`: `pip install -e .`) finds the
plugin in the checkout from any directory, without PYTHONPATH.

The other e2e tests put the checkout on PYTHONPATH, so a module or plugin the
wheel leaves out would pass them all and fail on a node (issue 11).
"""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO

DOORS = ("TCP task protocol", "HTTP API")
PLUGIN = "twisted/plugins/agent_plugin.py"
ENDPOINTS = "twisted/plugins/agent_endpoints.py"  # the mtls: endpoint string parser


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout}"
    return result


def _inside_checkout(path: str) -> bool:
    return not path or Path(path).resolve().is_relative_to(REPO.resolve())


def _env_blind_to_the_checkout(venv: Path) -> dict[str, str]:
    """As a shell on a node would have: the venv's bin/ first on PATH, no PYTHON*
    variable (PYTHONPATH above all), no active virtualenv, no user site."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if not _inside_checkout(p)]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["PYTHONNOUSERSITE"] = "1"
    return env


class Installed:
    def __init__(self, wheel: Path, venv: Path, home: Path):
        self.wheel, self.venv, self.home = wheel, venv, home
        self.env = _env_blind_to_the_checkout(venv)

    def run(self, script: str, *args) -> subprocess.CompletedProcess:
        """One of the venv's bin/ scripts, from outside the checkout."""
        return _run([self.venv / "bin" / script, *args], cwd=self.home, env=self.env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """The wheel built as `pip install .` builds it (isolated build env, hatchling
    from the index or pip's cache), installed into a new venv without pip."""
    root = tmp_path_factory.mktemp("wheel")
    assert not root.resolve().is_relative_to(REPO.resolve())
    dist, venv, home = root / "dist", root / "venv", root / "home"
    home.mkdir()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, REPO], cwd=home)
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=home)
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python",
          "install", "-q", "--no-compile", wheels[0]], cwd=home)
    return Installed(wheels[0], venv, home)


def _checkout_files_under(top: str) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(REPO / top):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        found.update((Path(dirpath) / f).relative_to(REPO).as_posix() for f in filenames
                     if not f.endswith((".pyc", ".pyo")) and f != "dropin.cache")
    return found


def test_the_wheel_holds_the_agent_package_whole_and_the_plugin_and_nothing_else(installed):
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        dist_info = {n for n in names if n.split("/")[0].endswith(".dist-info")}
        entry_points = next(wheel.read(n).decode() for n in dist_info
                            if n.endswith("/entry_points.txt"))
        metadata = next(wheel.read(n).decode() for n in dist_info if n.endswith("/METADATA"))
    shipped = names - dist_info
    # Every file under agent/: subpackages, and data such as agent/doors/http/static/*.
    assert shipped == _checkout_files_under("agent") | {PLUGIN, ENDPOINTS}
    for never in ("twisted/__init__.py", "twisted/plugins/__init__.py"):
        assert never not in names  # would overwrite the installed Twisted's own
    assert not [n for n in names if n.endswith("dropin.cache") or "__pycache__" in n
                or n.startswith(("tests/", "bench/"))]
    assert "agent-scheduler = agent.clients.scheduler:main" in entry_points
    assert "agentctl = agent.clients.ctl:main" in entry_points
    assert "Provides-Extra: test" in metadata


def test_the_installed_agent_runs_a_task_through_each_door_and_stops_clean(installed,
                                                                          start_agent):
    where = json.loads(installed.run(
        "python", "-c", "import json, sys, agent, twisted.plugins.agent_plugin as p; "
        "print(json.dumps([agent.__file__, p.__file__, sys.path]))").stdout)
    assert all(Path(f).resolve().is_relative_to(installed.venv.resolve()) for f in where[:2]), where
    assert not [p for p in where[2] if p and _inside_checkout(p)], where[2]
    assert "Per-node task agent" in installed.run("twistd", "--help").stdout

    data_dir = installed.home / "data"
    agent = start_agent("--http", "tcp:0:interface=127.0.0.1", "--data-dir", data_dir,
                        cwd=installed.home, doors=DOORS, twistd=[installed.venv / "bin" / "twistd"],
                        base_env=installed.env, startup_timeout=30.0)

    client = agent.connect()
    client.send({"command": ["echo", "hi"]})
    result = client.receive()
    client.close()
    assert (result["exit_code"], result["output"]) == (0, "hi\n"), result

    token = (data_dir / "token").read_text().strip()
    connection = http.client.HTTPConnection("127.0.0.1", agent.ports["HTTP API"], timeout=30)
    connection.request("POST", "/run", json.dumps({"command": "echo", "args": ["hi"]}),
                       {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert (response.status, response.read()) == (200, b"hi\n")
    connection.close()

    ran = installed.run("agentctl", "--url", f"http://127.0.0.1:{agent.ports['HTTP API']}",
                        "--token-file", data_dir / "token", "run", "--", "echo", "hi")
    assert ran.stdout == "hi\n"

    assert agent.stop() == 0, agent.log
    assert agent.survivors() == []
    assert "Traceback" not in agent.log, agent.log


def test_the_installed_twisted_finds_the_mtls_endpoint_plugin(installed):
    where = installed.run("python", "-c", "from twisted.plugin import getPlugins; "
                          "from twisted.internet.interfaces import IStreamServerEndpointStringParser as I; "
                          "import sys; [print(sys.modules[type(p).__module__].__file__) "
                          "for p in getPlugins(I) if p.prefix == 'mtls']").stdout.split()
    assert len(where) == 1 and Path(where[0]).resolve().is_relative_to(installed.venv.resolve()), where


def test_the_installed_scheduler_script_runs(installed):
    usage = installed.run("agent-scheduler", "--help").stdout
    assert usage.startswith("Usage: agent-scheduler"), usage


def test_the_installed_agentctl_script_runs(installed):
    usage = installed.run("agentctl", "--help").stdout
    assert usage.startswith("usage: agentctl"), usage
    assert "examples:" in usage


def test_the_development_install_finds_the_checkouts_plugin_from_anywhere(tmp_path):
    """`make install`'s editable install is one .pth line naming the checkout; Twisted's
    plugin scan follows it, so `make run` needs no PYTHONPATH and no reinstall after an edit.
    (Run by `make test`, whose interpreter is that install's.)"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    listed = _run([*twistd, "--help"], cwd=tmp_path, env=env).stdout
    assert "Per-node task agent" in listed, "no agent plugin: run `make install`?\n" + listed
    assert "--data-dir" in _run([*twistd, "agent", "--help"], cwd=tmp_path, env=env).stdout
    where = _run([sys.executable, "-c",
                  "import twisted.plugins.agent_plugin as p; print(p.__file__)"],
                 cwd=tmp_path, env=env).stdout.strip()
    assert Path(where).resolve() == (REPO / PLUGIN).resolve()
