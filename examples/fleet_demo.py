"""`make fleet`: a fleet on this machine, to watch it work.

A private PostgreSQL under ./fleet-data (kept between runs), N agents (N=3 by default)
working on its queue, examples/input.json and a few long tasks submitted, one agent
killed with SIGKILL while it runs a task, that task finishing on another node, then the
node list and the fleet history. The fleet keeps running until Ctrl-C, which stops
everything this script started.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.fleet import dsn as dsns  # noqa: E402
from agent.fleet import nodes, schema, tasks  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402

DATA = Path(os.environ.get("FLEET_DATA", REPO / "fleet-data")).resolve()
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
SCHEDULER = [sys.executable, "-m", "agent.clients.scheduler"]


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class DemoAgent:
    def __init__(self, name: str, dsn: str):
        self.name = name
        self.log_path = DATA / f"{name}.log"
        self.log_path.write_text("")
        self.proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", f"--logfile={self.log_path}", "agent",
             "--listen", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1",
             "--fleet", dsn, "--node-id", name, "--data-dir", str(DATA / name),
             "--fleet-lease", "5", "--parallel", "2", "--shutdown-grace", "2"],
            cwd=REPO / "examples", env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True)

    def joined(self) -> bool:
        return "joined the fleet" in self.log_path.read_text("utf-8", "replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(0.1)
    return value


def show_nodes(conn) -> None:
    print(f"{'node':10} {'state':9} {'gen':>4} {'running':>7}  heartbeat")
    for node in nodes.list_nodes(conn):
        print(f"{node.node_id:10} {node.state:9} {node.generation:>4} {node.running:>7}  "
              f"{node.heartbeat_at:%H:%M:%S}")


def show_history(conn, prefix: str) -> None:
    print(f"{'key':28} {'state':9} {'node':8} {'exit':>4} {'tries':>5}  stdout")
    for task in reversed(tasks.list_tasks(conn, limit=200)):
        if not task.key.startswith(prefix):
            continue
        tail = (task.stdout_tail or b"").decode("utf-8", "replace").strip().replace("\n", " | ")
        print(f"{task.key[-28:]:28} {task.state:9} {task.node_id or '-':8} "
              f"{'' if task.exit_code is None else task.exit_code:>4} {task.attempt:>5}  "
              f"{tail[:40]}")


def main() -> int:
    count = int(os.environ.get("N", "3"))
    DATA.mkdir(parents=True, exist_ok=True)
    server = PostgresServer(DATA / "postgres")
    agents: list[DemoAgent] = []
    try:
        say(f"PostgreSQL under {DATA / 'postgres'}")
        server.start()
        with server.admin_connect() as admin:
            if not admin.execute("SELECT 1 FROM pg_database WHERE datname = 'fleet'").fetchone():
                server.create_database("fleet")
        dsn = server.dsn_for("fleet")
        print(f"listening on 127.0.0.1:{server.port} (role agent, password in "
              f"{DATA / 'postgres' / 'agent.password'})")
        with psycopg.connect(dsn, autocommit=True) as conn:
            schema.migrate(conn)
            say(f"starting {count} agents: demo-1 .. demo-{count} (logs: {DATA}/demo-N.log)")
            agents = [DemoAgent(f"demo-{i}", dsn) for i in range(1, count + 1)]
            until(lambda: all(agent.joined() for agent in agents), 30, "the agents to join")
            show_nodes(conn)

            run = time.strftime("%H%M%S")
            prefix = f"demo-{run}-"
            batch = DATA / f"batch-{run}.jsonl"
            lines = [json.loads(line) for line in (REPO / "examples" / "input.json").read_text()
                     .splitlines() if line.strip()]
            batch.write_text("".join(json.dumps({**request, "id": f"{prefix}input-{i}"}) + "\n"
                                     for i, request in enumerate(lines, 1)))
            say("agent-scheduler --fleet --timeout-unit ms examples/input.json (ids are keys)")
            subprocess.run([*SCHEDULER, "--fleet", dsn, "--timeout-unit", "ms", str(batch)],
                           cwd=REPO, check=False)

            say("three long tasks (sleep 6, then echo)")
            for i in range(1, 4):
                tasks_file = DATA / f"long-{run}-{i}.json"
                tasks_file.write_text(json.dumps({"id": f"{prefix}long-{i}", "command":
                                                  ["sh", "-c", f"sleep 6; echo long {i} done"]}))
                subprocess.run([*SCHEDULER, "--fleet", dsn, "--no-wait", str(tasks_file)],
                               cwd=REPO, check=True, stdout=subprocess.DEVNULL)
            victim_task = until(lambda: next((t for t in tasks.list_tasks(conn, state="running")
                                              if t.key.startswith(prefix)), None), 30,
                                "a long task to start")
            victim = next(agent for agent in agents if agent.name == victim_task.node_id)
            time.sleep(1)
            say(f"kill -9 {victim.name} (pid {victim.proc.pid}), which runs "
                f"{victim_task.key}")
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            done = until(lambda: (t := tasks.get(conn, victim_task.key)).ended and t, 60,
                         f"{victim_task.key} to finish elsewhere")
            for attempt in done.attempts:
                print(f"  attempt {attempt.attempt} on {attempt.node_id}: {attempt.ending}"
                      f"{'' if not attempt.why else ' (' + attempt.why + ')'}")
            print(f"  result: {done.state} on {done.node_id}, stdout "
                  f"{(done.stdout_tail or b'').decode().strip()!r}")
            until(lambda: all(tasks.get(conn, f"{prefix}long-{i}").ended for i in range(1, 4)),
                  60, "the long tasks")

            say("nodes")
            show_nodes(conn)
            say("fleet history of this run")
            show_history(conn, prefix)
            say(f"the fleet keeps running: submit with\n  .venv/bin/agent-scheduler --fleet "
                f"'{dsns.for_log(dsn)}' FILE\n(password in "
                f"{DATA / 'postgres' / 'agent.password'}, or PGPASSWORD). Ctrl-C stops it all.")
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        say("stopping the agents and PostgreSQL")
        for agent in agents:
            agent.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
