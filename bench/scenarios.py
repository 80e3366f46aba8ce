"""The measurements, one function each, every one aimed at a `Target` (a port to send to).

A target is the simulator itself ("direct"), dario in front of it, or nginx in front of
it. Each function returns a plain dict of figures (milliseconds, requests/s, MB) that
`table` turns into rows; none of them prints. They run one at a time from the
benchmark's main thread; `RssSampler` and the halt-to-block clients use named threads
that are joined before the function returns.
"""

import dataclasses
import itertools
import json
import os
import socket
import statistics
import subprocess
import threading
import time

import loadgen
import procs
from rawhttp import Connection, ResponseParser, SseSplitter, build_request, event_data, message_body


@dataclasses.dataclass
class Target:
    name: str         # "direct", "dario" or "nginx"
    port: int
    pid: int          # the process whose RSS and CPU are read


def _ms(ns):
    return ns / 1e6


class RssSampler:
    """Samples a process's RSS on a named thread while a `with` block runs; keeps the peak."""

    def __init__(self, pid, interval_s=0.05):
        self.pid = pid
        self.interval_s = interval_s
        self.peak = procs.rss_mb(pid) or 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bench-rss-{pid}", daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self):
        rss = procs.rss_mb(self.pid)
        if rss is not None and rss > self.peak:
            self.peak = rss

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self.sample()


def _http_json(method, port, path, body=None):
    """A control call (simulator or gateway admin) on its own connection; the JSON answer.

    Raw sockets rather than urllib, which would honour proxy variables in the environment.
    """
    payload = json.dumps(body).encode() if body is not None else b""
    with Connection(port, timeout=10) as conn:
        parser, _, _, text = conn.exchange(build_request(port, path, payload, method=method))
    if parser.status != 200:
        raise RuntimeError(f"{method} {path} on port {port} answered {parser.status}: {text[:200]!r}")
    return json.loads(text)


def reset_simulator(port):
    """Forget the simulator's recorded requests (bounded, but a big heap) and knobs."""
    _http_json("POST", port, "/_sim/reset", {})


# -- 1. latency, one client -------------------------------------------------------------

def latency(target, count, warmup=50, body=None):
    """Non-streamed POST /v1/messages, one keep-alive client: p50/p99/mean in ms."""
    request = build_request(target.port, body=body or message_body())
    samples = []
    with Connection(target.port) as conn, RssSampler(target.pid) as rss:
        for i in range(warmup + count):
            parser, sent_ns, _, _ = conn.exchange(request)
            done_ns = time.monotonic_ns()
            if parser.status != 200:
                raise RuntimeError(f"{target.name} answered {parser.status}")
            if i >= warmup:
                samples.append(_ms(done_ns - sent_ns))
    samples.sort()
    return {"p50_ms": loadgen.percentile(samples, 50), "p99_ms": loadgen.percentile(samples, 99),
            "mean_ms": statistics.fmean(samples), "count": count, "rss_peak_mb": rss.peak}


# -- 2. throughput (and latency under concurrency) --------------------------------------

def throughput(target, clients, duration_s, processes=2, sim_pid=None, warmup_s=0.5):
    """Closed-loop load from `processes` client processes: requests/s, errors, latency, CPU."""
    request = build_request(target.port, body=message_body())
    cpu = {}

    def on_window(phase):
        cpu[phase] = (procs.cpu_seconds(target.pid), procs.cpu_seconds(sim_pid) if sim_pid else 0.0)

    with RssSampler(target.pid) as rss:
        result = loadgen.run_load(target.port, request, clients, duration_s, warmup_s=warmup_s,
                                  processes=processes, on_window=on_window)
    cores = os.cpu_count() or 1
    window = result.window_s
    return {"clients": clients, "rps": result.rps, "errors": result.errors,
            "p50_ms": result.percentile(50), "p99_ms": result.percentile(99),
            "rss_peak_mb": rss.peak, "client_processes": result.processes,
            "client_cpu_pct": 100 * result.client_cpu_s / window / cores,
            "server_cpu_pct": 100 * (cpu["end"][0] - cpu["start"][0]) / window / cores,
            "sim_cpu_pct": 100 * (cpu["end"][1] - cpu["start"][1]) / window / cores}


# -- 3. streams: first byte, relay lag, coalescing --------------------------------------

def stream_timing(target, framing, streams, events, delay_ms):
    """Streams with stamped events: TTFB, lag (receive time - sim_ts) per text event, and
    how many reads delivered more than one text event (coalescing)."""
    headers = {"x-sim-timestamps": "1", "x-sim-delay-ms": str(delay_ms),
               "x-sim-events": str(events), "x-sim-framing": framing}
    request = build_request(target.port, body=message_body(stream=True), headers=headers)
    ttfb, lags, coalesced_reads, max_per_read, received = [], [], 0, 0, 0
    # One client connection, kept alive where the response allows (a close-delimited
    # one from the simulator ends it): the first byte then times the relay, not the
    # TCP and thread set-up of a new connection.
    with Connection(target.port) as conn:
        conn.exchange(request)          # warm-up, not counted: opens the connections
        for _ in range(streams):
            splitter = SseSplitter()
            per_read = []

            def on_data(now_ns, piece, splitter=splitter, per_read=per_read):
                n = 0
                for event in splitter.feed(piece):
                    name, data = event_data(event)
                    if name == "content_block_delta" and data and "sim_ts" in data:
                        lags.append(_ms(now_ns - data["sim_ts"]))
                        n += 1
                per_read.append(n)

            parser, sent_ns, first_ns, _ = conn.exchange(request, on_data=on_data)
            if parser.status != 200:
                raise RuntimeError(f"{target.name} answered {parser.status} to a {framing} stream")
            ttfb.append(_ms(first_ns - sent_ns))
            received += sum(per_read)
            coalesced_reads += sum(1 for n in per_read if n > 1)
            max_per_read = max([max_per_read] + per_read)
    lags.sort()
    return {"framing": framing, "streams": streams, "events_expected": streams * events,
            "events_received": received, "ttfb_p50_ms": statistics.median(ttfb),
            "lag_median_ms": statistics.median(lags) if lags else None,
            "lag_p99_ms": loadgen.percentile(lags, 99), "lag_max_ms": lags[-1] if lags else None,
            "coalesced_reads": coalesced_reads, "max_events_per_read": max_per_read}


# -- 4. held load ----------------------------------------------------------------------

def held_streams(target, count, events, delay_ms, settle_s=2.0):
    """`count` slow streams held at once: errors, RSS before / peak while held / after,
    and open file descriptors before and after (what the process still holds on to)."""
    headers = {"x-sim-delay-ms": str(delay_ms), "x-sim-events": str(events)}
    request = build_request(target.port, body=message_body(stream=True), headers=headers)
    before = procs.rss_mb(target.pid)
    fds_before = procs.fd_count(target.pid)
    sampler = RssSampler(target.pid)
    threads = []

    def tick():
        sampler.sample()
        threads.append(procs.thread_count(target.pid) or 0)

    completed, errors, seconds = loadgen.hold_streams(target.port, request, count, on_tick=tick)
    time.sleep(settle_s)        # let connection threads end and memory be handed back
    return {"streams": count, "completed": completed, "errors": errors, "seconds": seconds,
            "rss_before_mb": before, "rss_peak_mb": sampler.peak,
            "rss_after_mb": procs.rss_mb(target.pid), "threads_peak": max(threads, default=0),
            "fds_before": fds_before, "fds_after": procs.fd_count(target.pid)}


# -- 5. halt-to-block --------------------------------------------------------------------

def _trigger(port, headers_at):
    """Send the overage stream; record when its response head has arrived; read it out."""
    body = message_body(stream=True)
    request = build_request(port, body=body, headers={
        "x-req-id": "trigger", "x-sim-claim": "overage", "x-sim-delay-ms": "50", "Connection": "close"})
    parser = ResponseParser()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        while not parser.done:
            data = sock.recv(65536)
            now = time.monotonic_ns()
            if not data:
                parser.eof()
                break
            parser.feed(data)
            if parser.status is not None and not headers_at:
                headers_at.append(now)
    return parser.status


def halt_run(gateway_port, sim_port, clients=32, lead_s=0.3, after_s=0.3, run_id=0, client_ports=None):
    """One run: `clients` hammer dario, one overage response halts it. Returns the counts.

    The overage answer goes through `gateway_port`; the clients hammer `client_ports`
    (spread over them; default: that same gateway), so a team's cross-gateway halt is the
    same measurement. late: requests sent after the halting response's head arrived that
    still reached the simulator (must be 0); in_flight: sent before that instant, arrived
    after.
    """
    client_ports = client_ports or [gateway_port]
    _http_json("POST", sim_port, "/_sim/reset", {})
    _http_json("POST", gateway_port, "/admin/resume", {})
    ids = itertools.count(1)
    sent, status, lock, stop = {}, {}, threading.Lock(), threading.Event()
    body = message_body()

    def client(port):
        with Connection(port, timeout=10) as conn:
            while not stop.is_set():
                rid = f"r{run_id}-{next(ids)}"
                request = build_request(port, body=body, headers={"x-req-id": rid})
                with lock:
                    sent[rid] = time.monotonic_ns()
                try:
                    parser, sent_ns, _, _ = conn.exchange(request)
                except OSError:
                    conn.close()
                    continue
                with lock:
                    sent[rid] = sent_ns      # taken right before sendall: closer to the truth
                    status[rid] = parser.status

    threads = [threading.Thread(target=client, args=(client_ports[i % len(client_ports)],),
                                name=f"bench-hammer-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(lead_s)
        headers_at = []
        trigger_status = _trigger(gateway_port, headers_at)
        time.sleep(after_s)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    recorded = _http_json("GET", sim_port, "/_sim/requests?since=0")["requests"]
    arrived = {r["id"]: r["arrived_ns"] for r in recorded}
    halt_ns = headers_at[0]
    with lock:
        sent_after = [rid for rid, t in sent.items() if t > halt_ns]
        late = [rid for rid in sent_after if rid in arrived]
        in_flight = [rid for rid, t in sent.items() if t <= halt_ns and arrived.get(rid, 0) > halt_ns]
        blocked = [rid for rid in sent_after if status.get(rid) == 503]
        total = len(sent)
    return {"trigger_status": trigger_status, "requests": total, "sent_after": len(sent_after),
            "blocked_after": len(blocked), "late": len(late), "in_flight": len(in_flight)}


def halt_to_block(gateway_port, sim_port, runs, clients=32, client_ports=None):
    """`runs` halt runs, resumed and reset between them. Sums and per-run figures.
    (`client_ports`: see `halt_run`; a team's cross-gateway halt-to-block.)"""
    per_run = [halt_run(gateway_port, sim_port, clients, run_id=i, client_ports=client_ports)
               for i in range(runs)]
    _http_json("POST", gateway_port, "/admin/resume", {})
    _http_json("POST", sim_port, "/_sim/reset", {})
    return {"runs": runs, "clients": clients, "late_total": sum(r["late"] for r in per_run),
            "runs_with_late": sum(1 for r in per_run if r["late"]),
            "sent_after_total": sum(r["sent_after"] for r in per_run),
            "blocked_after_total": sum(r["blocked_after"] for r in per_run),
            "in_flight_total": sum(r["in_flight"] for r in per_run),
            "in_flight_max": max(r["in_flight"] for r in per_run),
            "requests_total": sum(r["requests"] for r in per_run), "per_run": per_run}


# -- 7. start-up -------------------------------------------------------------------------

def _health_ok(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(build_request(port, "/health", method="GET"))
            parser = ResponseParser()
            while not parser.done:
                data = sock.recv(65536)
                if not data:
                    return False
                parser.feed(data)
            return parser.status == 200
    except OSError:
        return False


def startup(kids, upstream_port, home, runs, idle_wait_s=1.0, timeout_s=15.0):
    """Spawn `python dario.py proxy` `runs` times: ms to the first 200 from /health, idle RSS."""
    times, idle = [], []
    for _ in range(runs):
        port = procs.free_port()
        started = time.monotonic_ns()
        child = kids.spawn("dario-startup", procs.dario_argv(upstream_port, port), cwd=procs.REPO,
                           env=procs.dario_env(home), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        try:
            while not _health_ok(port):
                if child.popen.poll() is not None or time.monotonic_ns() - started > timeout_s * 1e9:
                    raise procs.StartError("dario did not answer /health")
                time.sleep(0.002)
            times.append(_ms(time.monotonic_ns() - started))
            time.sleep(idle_wait_s)
            idle.append(procs.rss_mb(child.pid))
        finally:
            kids.stop(child)
    return {"runs": runs, "startup_ms": statistics.median(times), "startup_max_ms": max(times),
            "idle_rss_mb": statistics.median(idle)}
