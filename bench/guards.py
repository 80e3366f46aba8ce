"""Benchmarks of what the guards hold: money that escapes a budget, memory under hostile load.

- `budget_escape`: a gateway with a $1 budget per day takes 200 mixed generation requests
  from 16 clients at once: plain and streamed messages, OpenAI chats with and without
  `stream_options.include_usage`, gzip answers, clients that ask for brotli, and clients
  that hang up at random points. What the upstream billed is computed from what reached
  it (the simulator's usage for each request it received, priced like dario prices it);
  what escaped is that bill beyond the budget. The target is $0 beyond one request's
  reservation.
- `stalled_memory`: 1024 connections that stall with maximal request heads (100 lines of
  64 KiB, never finished) or maximal bodies (32 MiB declared, trickled): dario's RSS
  against its configured totals for heads and bodies in flight.

Both start their own gateway (a fresh DARIO_HOME) so their state cannot leak into the
other measurements. Threads are named and joined before a function returns.
"""

import json
import os
import random
import resource
import socket
import sys
import threading
import time

import procs
import scenarios
from rawhttp import build_request

sys.path.insert(0, procs.REPO)
from dario_lib import budgets as budget_math, pricing  # noqa: E402  (the repo's own pricing)

BUDGET_USD = 1.0
MODEL = "claude-sonnet-4-5"
MAX_TOKENS = 2000
EVENTS = 400                    # simulator text deltas per answer: 800 output tokens


def _kinds():
    """(name, path, body dict, extra headers) of the mixed request kinds."""
    messages = [{"role": "user", "content": "count to forty " * 20}]
    plain = {"model": MODEL, "max_tokens": MAX_TOKENS, "messages": messages}
    return [
        ("plain", "/v1/messages", plain, {}),
        ("stream", "/v1/messages", dict(plain, stream=True), {}),
        ("openai", "/v1/chat/completions", dict(plain, stream=True), {}),
        ("openai+usage", "/v1/chat/completions",
         dict(plain, stream=True, stream_options={"include_usage": True}), {}),
        ("gzip", "/v1/messages", plain, {"x-sim-gzip": "1", "Accept-Encoding": "gzip"}),
        ("br", "/v1/messages", plain, {"Accept-Encoding": "br"}),
        ("hang-up", "/v1/messages", dict(plain, stream=True), {"x-sim-delay-ms": "5"}),
    ]


def _upstream_bill(body_len):
    """What the simulator's usage for one request costs: input is body/4, output 2*EVENTS."""
    usd, _ = pricing.estimate(MODEL, max(1, body_len // 4), 2 * EVENTS)
    return usd


def _send(port, path, body, headers, hang_up_after):
    """One request on its own connection; reads the answer (or hangs up early). Status or None."""
    request = build_request(port, path, body, {"x-sim-events": str(EVENTS), **headers, "Connection": "close"})
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request)
            got = b""
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                got += piece
                if hang_up_after is not None and len(got) >= hang_up_after:
                    break
            return int(got[9:12]) if got[:5] == b"HTTP/" else None
    except OSError:
        return None


def budget_escape(kids, sim_port, home, requests_total=200, clients=16, seed=7):
    """The mixed requests through one gateway with a $1 budget (see `mixed_against_budget`)."""
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, "config.json"), "w") as f:
        json.dump({"guards": {"budgets": [{"account": "*", "usd": BUDGET_USD, "window": "1d"}]}}, f)
    gateway = kids.dario(sim_port, home)
    try:
        return mixed_against_budget([gateway.port], sim_port, requests_total, clients, seed)
    finally:
        kids.stop(gateway)


def mixed_against_budget(ports, sim_port, requests_total=200, clients=16, seed=7):
    """`requests_total` mixed requests from `clients` threads, spread over the gateways on
    `ports` (which share one $1 budget): what the upstream billed, and what escaped."""
    scenarios.reset_simulator(sim_port)
    rng = random.Random(seed)
    kinds = _kinds()
    jobs = []
    for n in range(requests_total):
        name, path, body, headers = kinds[n % len(kinds)]
        hang_up = rng.randint(1, 1500) if name == "hang-up" else None
        jobs.append((n, ports[n % len(ports)], path, json.dumps(body).encode(),
                     dict(headers, **{"x-req-id": str(n)}), hang_up))
    statuses, lock, queue = {}, threading.Lock(), list(jobs)

    def client():
        while True:
            with lock:
                if not queue:
                    return
                n, port, path, data, headers, hang_up = queue.pop(0)
            status = _send(port, path, data, headers, hang_up)
            with lock:
                statuses[n] = status

    threads = [threading.Thread(target=client, name=f"bench-budget-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(0.5)                     # let hang-ups settle their records
    recorded = scenarios._http_json("GET", sim_port, "/_sim/requests?since=0")["requests"]
    received = {r["id"] for r in recorded if r["id"] is not None}
    sizes = {str(n): len(data) for n, _, _, data, _, _ in jobs}
    billed = sum(_upstream_bill(sizes[rid]) for rid in received if rid in sizes)
    reservation = max(budget_math.worst_case_usd(MODEL, len(data), MAX_TOKENS) for _, _, _, data, _, _ in jobs)
    status = scenarios._http_json("GET", ports[0], "/status")
    counted = status["budgets"][0]["spentUsd"] if status.get("budgets") else None
    return {"requests": requests_total, "clients": clients, "gateways": len(ports), "budget_usd": BUDGET_USD,
            "reached_upstream": len(received), "upstream_billed_usd": round(billed, 4),
            "dario_counted_usd": counted, "escaped_usd": round(max(0.0, billed - BUDGET_USD), 4),
            "one_reservation_usd": round(reservation, 4),
            "answered": {str(code): sum(1 for s in statuses.values() if s == code)
                         for code in sorted({s for s in statuses.values() if s is not None})}}


def stalled_memory(kids, sim_port, home, connections=1024):
    """1024 stalled connections, half with maximal heads, half with maximal bodies."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < connections + 256:
        return {"status": f"skipped: the descriptor limit ({hard}) is below {connections + 256}"}
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, connections + 256), hard))
    os.makedirs(home, exist_ok=True)
    gateway = kids.dario(sim_port, home)
    idle = procs.rss_mb(gateway.pid)
    socks, refused, peak = [], 0, idle
    line = b"X-Pad: " + b"a" * 65000 + b"\r\n"
    head = (b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: bench\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (32 * 1024 * 1024))
    chunk = b"x" * 65536
    began = time.monotonic()
    try:
        for n in range(connections):
            try:
                sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
                sock.setblocking(False)
                if n % 2:
                    sock.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                else:
                    sock.send(head)
                socks.append((n, sock))
            except OSError:
                refused += 1
        # Keep feeding every connection (head lines, body bytes) until the gateway stops
        # taking them, for up to 20 s: what it holds then is the figure.
        deadline = time.monotonic() + 20
        sent = {n: 0 for n, _ in socks}
        while time.monotonic() < deadline:
            progressed = False
            for n, sock in socks:
                limit = 98 * len(line) if n % 2 else 32 * 1024 * 1024
                if sent[n] >= limit:
                    continue
                try:
                    wrote = sock.send(line if n % 2 else chunk)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    sent[n] = limit
                    continue
                sent[n] += wrote
                progressed = True
            rss = procs.rss_mb(gateway.pid) or 0
            peak = max(peak, rss)
            if not progressed:
                time.sleep(0.05)
        peak = max(peak, procs.rss_mb(gateway.pid) or 0)
        for _, sock in socks:
            sock.close()
        socks = []
        # Once the crowd is gone (its connections take up to a second to close), the
        # gateway must answer again.
        still_serving = _answers(gateway.port, "/health", within_s=5)
    finally:
        for _, sock in socks:
            sock.close()
        kids.stop(gateway)
    return {"connections": connections, "idle_rss_mb": idle, "peak_rss_mb": round(peak, 1),
            "heads_total_mb": 64, "bodies_total_mb": 256, "refused_at_connect": refused,
            "seconds": round(time.monotonic() - began, 1), "health_after": still_serving}


def _answers(port, path, within_s):
    """Does `path` answer 200 within `within_s` seconds?"""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            scenarios._http_json("GET", port, path)
            return True
        except (OSError, RuntimeError, ValueError):
            time.sleep(0.1)
    return False
