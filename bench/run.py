"""dario's benchmark: `python bench/run.py [--quick] [--runs N] [--no-nginx] [--json PATH]`.

Starts the package's simulator, dario (`python dario.py proxy`, its own process, a temp
DARIO_HOME) and nginx (a reverse proxy to the same simulator: the floor for one extra
hop), each as a child process, and measures each path in the same run: added latency,
throughput, stream relay timing, held streams and memory, halt-to-block (dario only),
cost growth with clients and body size, and start-up. Prints one table and, last, one
`SUMMARY:` line; `--json` writes every figure, `--plot` the cost-growth PNG.

Everything runs on one machine: the client processes, the gateway and the simulator
share its cores. All children are stopped on exit, whatever ends the run.
"""

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

import guards
import loadgen
import plot
import procs
import pyspy
import scenarios
import table
import team
from rawhttp import build_request, message_body

KB, MB = 1024, 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of each measurement to take."""

    latency_requests: int
    latency_warmup: int
    load_seconds: float
    load_warmup_s: float
    clients: tuple             # concurrency levels; 16 and 64 are the throughput rows
    streams: int               # streams per framing per target
    stream_events: int
    stream_delay_ms: int
    held_streams: int
    held_events: int
    held_delay_ms: int
    bodies: tuple              # (label, bytes, requests)
    startup_runs: int
    halt_runs: int


FULL = Plan(latency_requests=2000, latency_warmup=200, load_seconds=5.0, load_warmup_s=1.0,
            clients=(1, 16, 64, 256), streams=10, stream_events=20, stream_delay_ms=20,
            held_streams=256, held_events=25, held_delay_ms=200,
            bodies=(("1KB", KB, 500), ("100KB", 100 * KB, 200), ("5MB", 5 * MB, 20)),
            startup_runs=7, halt_runs=20)
QUICK = Plan(latency_requests=200, latency_warmup=20, load_seconds=1.0, load_warmup_s=0.3,
             clients=(1, 16, 64), streams=2, stream_events=5, stream_delay_ms=20,
             held_streams=64, held_events=5, held_delay_ms=100,
             bodies=(("1KB", KB, 30), ("100KB", 100 * KB, 10), ("5MB", 5 * MB, 3)),
             startup_runs=2, halt_runs=3)

LOAD_PROCESSES = 2


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def machine_info():
    """What the numbers were taken on."""
    info = {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                                  if line.startswith("Model name")), None)
    except (OSError, subprocess.SubprocessError):
        info["cpu_model"] = None
    with open("/proc/meminfo") as f:
        info["mem_total_gb"] = round(int(f.readline().split()[1]) / MB, 1)
    return info


def measure_all(args, plan, kids, tmp, figures):
    """Every measurement, in an order where one disturbs the next as little as possible:
    start-up first, light single-client work next (so memory figures start near idle),
    streams while the machine is quiet, then the heavy load, the halt runs, and held
    streams on a fresh gateway."""
    sim = kids.simulator()
    log(f"simulator on port {sim.port}")
    nginx_binary = _nginx_binary(args, figures)
    log(f"start-up: {plan.startup_runs} spawns of `python dario.py proxy`")
    figures["startup"] = scenarios.startup(kids, sim.port, _home(tmp, "home-startup"), plan.startup_runs,
                                           idle_wait_s=0.5 if args.quick else 1.0)
    gateway = kids.dario(sim.port, _home(tmp, "home"))
    log(f"dario on port {gateway.port}")
    targets = [scenarios.Target("direct", sim.port, sim.pid),
               scenarios.Target("dario", gateway.port, gateway.pid)]
    if nginx_binary:
        nginx = kids.nginx(nginx_binary, sim.port, _home(tmp, "nginx"))
        figures["nginx_idle_rss_mb"] = procs.rss_mb(nginx.pid)
        targets.append(scenarios.Target("nginx", nginx.port, nginx.pid))
        log(f"nginx on port {nginx.port}")
    for section in ("latency", "bodies", "streams", "throughput", "held"):
        figures[section] = {t.name: {} for t in targets}

    for t in targets:
        scenarios.reset_simulator(sim.port)
        log(f"{t.name}: latency, {plan.latency_requests} requests, 1 client")
        figures["latency"][t.name] = scenarios.latency(t, plan.latency_requests, plan.latency_warmup)
        for label, size, count in plan.bodies:
            log(f"{t.name}: {count} requests with a {label} body")
            figures["bodies"][t.name][label] = scenarios.latency(
                t, count, warmup=2, body=message_body(pad_bytes=size))
    for t in targets:
        scenarios.reset_simulator(sim.port)
        time.sleep(0.5)                 # let the step before die down
        log(f"{t.name}: streams, {plan.streams} per framing")
        for framing in ("chunked", "close"):
            figures["streams"][t.name][framing] = scenarios.stream_timing(
                t, framing, plan.streams, plan.stream_events, plan.stream_delay_ms)
    for t in targets:
        for clients in plan.clients:
            scenarios.reset_simulator(sim.port)
            log(f"{t.name}: {clients} clients for {plan.load_seconds:g}s")
            figures["throughput"][t.name][str(clients)] = scenarios.throughput(
                t, clients, plan.load_seconds, LOAD_PROCESSES, warmup_s=plan.load_warmup_s,
                sim_pid=sim.pid if t.pid != sim.pid else None)
    if args.profile:
        figures["profile"] = profile_gateway(targets[1], plan, args.profile)
    log(f"dario: halt-to-block, {args.runs} runs with 32 clients")
    figures["halt"] = scenarios.halt_to_block(gateway.port, sim.port, args.runs)

    log("dario: 200 mixed requests from 16 clients against a $1 budget")
    scenarios.reset_simulator(sim.port)
    figures["budget_escape"] = guards.budget_escape(kids, sim.port, _home(tmp, "home-budget"),
                                                    requests_total=60 if args.quick else 200)
    if not args.quick:
        log("dario: 1024 stalled connections with maximal heads and bodies")
        figures["stalled_memory"] = guards.stalled_memory(kids, sim.port, _home(tmp, "home-stalled"))

    if args.store == "redis":
        log("team: file store vs Redis store, cross-gateway halt-to-block, a budget over 3 gateways")
        figures["team"] = team.team_figures(
            kids, sim.port, tmp, args.redis_url, latency_requests=plan.latency_requests,
            latency_warmup=plan.latency_warmup, load_seconds=plan.load_seconds,
            load_warmup_s=plan.load_warmup_s, halt_runs=args.runs,
            budget_requests=60 if args.quick else 200, sim_pid=sim.pid)

    # Held streams go to a fresh gateway, so "after" can be compared with its idle RSS.
    fresh = kids.dario(sim.port, _home(tmp, "home-held"))
    time.sleep(0.5)
    for t in [targets[0], scenarios.Target("dario", fresh.port, fresh.pid)] + targets[2:]:
        scenarios.reset_simulator(sim.port)
        log(f"{t.name}: {plan.held_streams} held streams")
        figures["held"][t.name] = scenarios.held_streams(
            t, plan.held_streams, plan.held_events, plan.held_delay_ms, settle_s=1.0 if args.quick else 2.0)
    kids.stop(fresh)


def _home(tmp, name):
    path = os.path.join(tmp, name)
    os.makedirs(path)
    return path


def _nginx_binary(args, figures):
    """nginx's path, or None (skipped, or not installable); the reason goes into figures."""
    if args.no_nginx:
        figures["nginx"] = {"status": "skipped (--no-nginx)", "version": None}
        return None
    binary, message = procs.find_or_install_nginx(allow_install=not args.quick)
    log(message)
    figures["nginx"] = {"status": message, "version": procs.nginx_version(binary) if binary else None}
    return binary


def profile_gateway(target, plan, path):
    """A separate, unmeasured 16-client run with py-spy sampling the gateway's GIL holder."""
    binary = pyspy.find()
    if binary is None:
        log("profile skipped: py-spy is not installed (pip install py-spy)")
        return {"status": "py-spy not installed"}
    seconds = max(3, int(plan.load_seconds))
    log(f"dario: profiling {seconds}s of 16-client load with py-spy --gil into {path}")
    spy = pyspy.record(binary, target.pid, seconds, path)
    result = loadgen.run_load(target.port, build_request(target.port, body=message_body()), 16,
                              seconds + 1, warmup_s=0.2, processes=LOAD_PROCESSES)
    _, err = spy.communicate(timeout=60)
    if spy.returncode != 0:
        log(f"py-spy failed: {err.strip()[-300:]}")
        return {"status": f"py-spy failed: {err.strip()[-300:]}"}
    return {"status": "ok", "file": path, "rps_while_profiled": result.rps,
            **pyspy.top_functions(path)}


def print_profile(profile, limit=12):
    """The profile as three short lists: self time, inclusive time, self time per package."""
    if not profile or profile.get("status") != "ok":
        return
    print(f"\ndario under 16 clients, py-spy --gil: {profile['samples']} samples of the thread "
          f"holding the GIL ({profile['rps_while_profiled']:.0f} req/s while sampled)")
    print(f"  {'self %':>6}  {'function':58} | {'total %':>7}  function")
    for (name, self_pct), (tname, total_pct) in zip(profile["self"][:limit], profile["total"][:limit]):
        print(f"  {self_pct:6.1f}  {name[:58]:58} | {total_pct:7.1f}  {tname[:60]}")
    print("  self % by package: " + ", ".join(f"{name} {pct:.0f}%" for name, pct in profile["packages"][:8]))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny counts (smoke test); no nginx install, no plot unless --plot")
    parser.add_argument("--runs", type=int, default=None, help="halt-to-block runs (default 20)")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx column")
    parser.add_argument("--json", metavar="PATH", help="write all figures as JSON")
    parser.add_argument("--plot", metavar="PATH",
                        help="cost-growth PNG (default docs/benchmarks.png; none with --quick)")
    parser.add_argument("--store", choices=("file", "redis"), default="file",
                        help="redis: also measure gateways sharing a Redis store (issue 13's figures)")
    parser.add_argument("--redis-url", metavar="URL",
                        help="with --store=redis: use this Redis instead of starting redis-server")
    parser.add_argument("--profile", metavar="PATH",
                        help="also sample dario with py-spy under 16 clients (raw stacks to PATH)")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def _terminate(signum, frame):
    raise SystemExit(128 + signum)      # so the finally blocks stop every child


def main(argv=None):
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.runs is None:
        args.runs = plan.halt_runs
    if args.plot is None and not args.quick:
        args.plot = os.path.join(procs.REPO, "docs", "benchmarks.png")
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    figures = {"machine": machine_info(), "plan": dataclasses.asdict(plan), "quick": args.quick,
               "growth_clients": list(plan.clients), "growth_bodies": [b[0] for b in plan.bodies],
               "loadgen": f"python, {LOAD_PROCESSES} client processes, one selectors loop each "
                          "over raw keep-alive sockets"}
    figures["machine"]["busy_before_pct"] = round(procs.machine_busy_pct(), 1)
    if figures["machine"]["busy_before_pct"] > 10:
        log(f"warning: the machine is {figures['machine']['busy_before_pct']:.0f}% busy before the "
            "run starts; other processes will skew the figures")
    cpu_before = procs.cpu_snapshot()
    with procs.Children() as kids, tempfile.TemporaryDirectory(prefix="dario-bench-") as tmp:
        measure_all(args, plan, kids, tmp, figures)
    figures["machine"]["others_during_pct"] = round(procs.others_busy_pct(cpu_before, procs.cpu_snapshot()), 1)
    figures["seconds"] = round(time.monotonic() - started, 1)

    print_report(args, figures)
    return 0


def print_report(args, figures):
    """The context lines, the table, the profile, the plot and JSON, then SUMMARY last."""
    rows = table.build_rows(figures)
    has_nginx = bool(figures.get("latency", {}).get("nginx"))
    machine = figures["machine"]
    print(f"dario benchmark: {machine['cpus']} CPUs ({machine['cpu_model']}), "
          f"{machine['mem_total_gb']} GB, Python {machine['python']}, kernel {machine['kernel']}; "
          f"clients, gateway and simulator share the CPUs")
    print(f"other processes on the machine: {machine['busy_before_pct']:.0f}% of all CPUs busy just "
          f"before the run, {machine['others_during_pct']:.0f}% used by them during it")
    print(f"load generator: {figures['loadgen']}; nginx: {figures['nginx']['status']}"
          + (f" ({figures['nginx']['version']})" if figures["nginx"]["version"] else ""))
    print(f"mode: {'quick' if args.quick else 'full'}, {figures['seconds']} s\n")
    print(table.render(rows, has_nginx))
    print_profile(figures.get("profile"))
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        print("\n" + plot.write_plot(figures, args.plot))
    line = table.summary(rows, figures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": table.as_json(rows), "figures": figures, "summary": line}, f, indent=1)
    print(line)

if __name__ == "__main__":
    sys.exit(main())
