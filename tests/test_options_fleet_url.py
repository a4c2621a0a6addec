"""--fleet-url: the address a fleet node gives for its HTTP door, where fleet records point
for a task's whole output."""
from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from agent.options import Options
from agent.service import build

DSN = "host=127.0.0.1 port=9 dbname=fleet"


def parse(tmp_path, *argv) -> Options:
    options = Options(environ={})
    options.parseOptions(["--data-dir", str(tmp_path / "data"), *argv])
    return options


def test_the_node_registers_the_url_it_is_given(tmp_path):
    options = parse(tmp_path, "--fleet", DSN, "--fleet-url", "https://node7:8080/")
    agent = build(options, Clock())
    assert agent.fleet.config.http == "https://node7:8080"


def test_without_it_the_node_gives_no_address(tmp_path):
    agent = build(parse(tmp_path, "--fleet", DSN), Clock())
    assert agent.fleet.config.http is None


@pytest.mark.parametrize("url", ["node7:8080", "ftp://node7", "http://", "http://node7:port",
                                 "https://node7:8080/?x=1", "http://node 7:8080"])
def test_a_url_that_is_not_http_or_https_is_refused(tmp_path, url):
    with pytest.raises(usage.UsageError, match="--fleet-url must look like"):
        parse(tmp_path, "--fleet", DSN, "--fleet-url", url)


def test_it_needs_fleet(tmp_path):
    with pytest.raises(usage.UsageError, match="--fleet-url needs --fleet"):
        parse(tmp_path, "--fleet-url", "https://node7:8080")
