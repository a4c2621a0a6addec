"""What --fleet adds to the agent as service.build wires it (nothing connects here): the
node's HTTP address (--fleet-url), where fleet records point for a task's whole output,
and its figures on GET /metrics."""
from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from agent.fleet.database import Database
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


def _metrics(agent) -> str:
    """What GET /metrics answers (its handler, called as the router would)."""
    [route] = [r for r in agent.site.resource.routes if r.pattern == "/metrics"]
    return route.handler(None).body.decode()


def test_a_fleet_agent_shows_its_node_in_its_metrics_from_the_start(tmp_path):
    metrics = _metrics(build(parse(tmp_path, "--fleet", DSN, "--http", "tcp:0"), Clock()))
    assert "agent_fleet_lease_valid 0.0" in metrics and "agent_fleet_claims_total 0.0" in metrics
    assert "agent_fleet_heartbeat_age_seconds" not in metrics  # not registered yet


def test_an_agent_not_in_a_fleet_has_no_fleet_metrics(tmp_path):
    assert "agent_fleet_" not in _metrics(build(parse(tmp_path, "--http", "tcp:0"), Clock()))


def _fleet_database_of_the_site(agent):
    [route] = [r for r in agent.site.resource.routes if r.pattern == "/fleet/nodes"]
    return route.handler.__self__._database


def test_the_http_door_reads_the_fleet_through_a_connection_of_its_own(tmp_path):
    agent = build(parse(tmp_path, "--fleet", DSN, "--http", "tcp:0"), Clock())
    database = _fleet_database_of_the_site(agent)
    assert isinstance(database, Database) and database.name == "http"
    assert database not in (agent.fleet._work, agent.fleet.lease._beat)
    services = list(agent)
    closing = next(s for s in services if getattr(s, "_database", None) is database)
    door = next(s for s in services
                if getattr(getattr(s, "endpoint", None), "_what", None) == "HTTP API")
    assert services.index(closing) < services.index(door), "it would close before the door stops"


def test_without_fleet_the_http_door_has_no_fleet_connection(tmp_path):
    assert _fleet_database_of_the_site(build(parse(tmp_path, "--http", "tcp:0"), Clock())) is None
