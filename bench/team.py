"""Benchmarks of a team of gateways on one Redis (`--store=redis`, issue 13).

`team_figures(kids, sim_port, tmp, redis_url)` measures, in one run and against the same
simulator, a gateway on the file store and gateways on a Redis store:

- `latency`: added p50/p99 per request (one keep-alive client, non-streamed, as
  `scenarios.latency`): each gateway's figure minus the simulator's own, measured here.
- `throughput`: requests/s at 16 clients (`loadgen.run_load` through `scenarios.throughput`).
- `halt`: cross-gateway halt-to-block. Clients hammer gateways B and C while one overage
  answer goes through gateway A; `late` counts requests sent to B or C after A's
  halting headers reached A's client that still reached the upstream (target 0).
- `budget`: three gateways share a $1 budget; 16 clients send mixed requests
  (`guards._kinds`) spread over the three; what escaped is the upstream's bill beyond
  the budget (target: at most one request's reservation).

Every gateway is a `python dario.py proxy` child with its own DARIO_HOME; each scenario
uses its own Redis namespace, so none sees another's halts or spend. `start_redis(kids,
workdir)` starts redis-server (AOF on, as the README recommends) as one of the `kids`.
Runs on the benchmark's main thread; client threads are named and joined.
"""

import json
import os
import shutil
import subprocess

import guards
import procs
import scenarios

_REDIS_READY_S = 10.0


def start_redis(kids, workdir):
    """redis-server on a free loopback port, files in `workdir`, stopped with the kids.
    Returns its URL. Raises procs.StartError when it is not installed or does not come up."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(binary, os.X_OK):
        raise procs.StartError("redis-server is not installed (Debian package redis-server)")
    os.makedirs(workdir, exist_ok=True)
    port = procs.free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir, "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no"]
    child = kids.spawn("redis", argv, port=port, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.wait_for_port(port, _REDIS_READY_S, child)
    return f"redis://127.0.0.1:{port}/0"


def _gateway(kids, sim_port, tmp, name, config):
    home = os.path.join(tmp, name)
    os.makedirs(home)
    with open(os.path.join(home, "config.json"), "w") as f:
        json.dump(config, f)
    return kids.dario(sim_port, home)


def _store(redis_url, namespace):
    return {"store": {"url": redis_url, "namespace": namespace}}


def team_figures(kids, sim_port, tmp, redis_url=None, latency_requests=2000, latency_warmup=200,
                 load_seconds=5.0, load_warmup_s=1.0, halt_runs=10, halt_clients=32, budget_requests=200,
                 sim_pid=None):
    """Every team figure (see the module docstring) as a dict; `redis_url` None starts one."""
    tmp = os.path.join(tmp, "team")
    os.makedirs(tmp, exist_ok=True)
    if redis_url is None:
        redis_url = start_redis(kids, os.path.join(tmp, "redis-server"))
    figures = {"redis": redis_url}
    file_gateway = _gateway(kids, sim_port, tmp, "file", {})
    redis_gateway = _gateway(kids, sim_port, tmp, "redis", _store(redis_url, "bench-latency"))
    direct = scenarios.Target("direct", sim_port, sim_pid or file_gateway.pid)
    targets = [scenarios.Target("file", file_gateway.port, file_gateway.pid),
               scenarios.Target("redis", redis_gateway.port, redis_gateway.pid)]

    scenarios.reset_simulator(sim_port)
    base = scenarios.latency(direct, latency_requests, latency_warmup)
    figures["latency"] = {"direct": base}
    for target in targets:
        scenarios.reset_simulator(sim_port)
        got = scenarios.latency(target, latency_requests, latency_warmup)
        got["added_p50_ms"] = got["p50_ms"] - base["p50_ms"]
        got["added_p99_ms"] = got["p99_ms"] - base["p99_ms"]
        figures["latency"][target.name] = got
    figures["throughput"] = {}
    for target in targets:
        scenarios.reset_simulator(sim_port)
        figures["throughput"][target.name] = scenarios.throughput(
            target, 16, load_seconds, processes=2, sim_pid=sim_pid, warmup_s=load_warmup_s)
    figures["redis_store"] = scenarios._http_json("GET", redis_gateway.port, "/status").get("store")
    kids.stop(file_gateway)
    kids.stop(redis_gateway)

    trio = [_gateway(kids, sim_port, tmp, f"halt-{n}", _store(redis_url, "bench-halt")) for n in range(3)]
    # The overage answer goes through the first gateway; the clients hammer the other two
    # (a resume through the first resumes the whole team).
    figures["halt"] = dict(scenarios.halt_to_block(trio[0].port, sim_port, halt_runs, halt_clients,
                                                   client_ports=[g.port for g in trio[1:]]), gateways=3)
    for child in trio:
        kids.stop(child)

    config = dict(_store(redis_url, "bench-budget"),
                  guards={"budgets": [{"account": "*", "usd": guards.BUDGET_USD, "window": "1d"}]})
    trio = [_gateway(kids, sim_port, tmp, f"budget-{n}", config) for n in range(3)]
    figures["budget"] = team_budget_escape(trio, sim_port, budget_requests)
    for child in trio:
        kids.stop(child)
    return figures


# -- budget overspend across three gateways ----------------------------------------------

def team_budget_escape(gateways, sim_port, requests_total=200, clients=16, seed=7):
    """guards' mixed requests, spread over `gateways` sharing one budget."""
    return guards.mixed_against_budget([g.port for g in gateways], sim_port, requests_total, clients, seed)
