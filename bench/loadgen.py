"""Closed-loop load from several client processes, so the client is not what is measured.

Python is GIL-bound, so `run_load` spreads the connections over `processes` worker
processes (multiprocessing, spawn). Each worker drives its share of keep-alive
connections with one `selectors` loop over raw non-blocking sockets: send the prebuilt
request, parse the response incrementally (`rawhttp.ResponseParser`), send the next one
at once. Workers connect, report ready, and start together at a CLOCK_MONOTONIC
instant the parent then sets (system-wide on Linux, so comparable across processes);
they warm up, then count only what completes inside the measuring window. Each reports
completions, errors, latencies and its own CPU time, so the report can show how much
of the machine the client itself used.

`hold_streams` is the other load shape: many slow streams held open at once, in this
process, while a callback samples the server (its RSS).
"""

import dataclasses
import multiprocessing
import queue
import selectors
import socket
import time

from rawhttp import RECV_SIZE, ProtocolError, ResponseParser


@dataclasses.dataclass
class LoadResult:
    clients: int
    processes: int
    window_s: float
    completed: int
    errors: int
    latencies_ms: list      # one per request completed in the window, sorted
    client_cpu_s: float     # CPU the worker processes used during the window

    @property
    def rps(self):
        return self.completed / self.window_s if self.window_s else 0.0

    def percentile(self, p):
        return percentile(self.latencies_ms, p)


def percentile(sorted_values, p):
    """Nearest-rank percentile of an already sorted list; None when it is empty."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


class _Slot:
    """One client connection in a worker's selector loop."""

    __slots__ = ("sock", "parser", "sent_ns")

    def __init__(self):
        self.sock = None
        self.parser = None
        self.sent_ns = 0


def _connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def _send(slot, request):
    slot.parser = ResponseParser()
    slot.sent_ns = time.monotonic_ns()
    sent = slot.sock.send(request)
    if sent < len(request):       # rare for a small request; finish it blocking
        slot.sock.setblocking(True)
        slot.sock.sendall(request[sent:])
        slot.sock.setblocking(False)


def _worker(port, request, conns, go, times, results):
    """Runs in a worker process: connect, report ready, wait for `go`, drive `conns`
    connections until the end of the window in `times`, report once."""
    sel = selectors.DefaultSelector()
    slots = []
    completed = errors = 0
    latencies = []
    cpu_at_measure = None

    def reopen(slot):
        if slot.sock is not None:
            sel.unregister(slot.sock)
            slot.sock.close()
        slot.sock = _connect(port)
        sel.register(slot.sock, selectors.EVENT_READ, slot)
        _send(slot, request)

    try:
        for _ in range(conns):
            slot = _Slot()
            slot.sock = _connect(port)
            slots.append(slot)
    except OSError as err:
        results.put(f"cannot connect: {err}")
        return
    results.put("ready")
    if not go.wait(60):
        return
    start_ns, measure_ns, end_ns = times[:]
    time.sleep(max(0, (start_ns - time.monotonic_ns()) / 1e9))
    for slot in slots:
        sel.register(slot.sock, selectors.EVENT_READ, slot)
        _send(slot, request)
    while (now := time.monotonic_ns()) < end_ns:
        if cpu_at_measure is None and now >= measure_ns:
            cpu_at_measure = time.process_time()
        for key, _ in sel.select(timeout=0.05):
            slot = key.data
            in_window = measure_ns <= time.monotonic_ns() < end_ns
            try:
                data = slot.sock.recv(RECV_SIZE)
                if not data:
                    slot.parser.eof()
                else:
                    slot.parser.feed(data)
            except (OSError, ProtocolError):
                errors += in_window
                reopen(slot)
                continue
            if not slot.parser.done:
                continue
            done_ns = time.monotonic_ns()
            if in_window:
                if slot.parser.status == 200:
                    completed += 1
                    latencies.append((done_ns - slot.sent_ns) / 1e6)
                else:
                    errors += 1
            if slot.parser.keep_alive:
                _send(slot, request)
            else:
                reopen(slot)
    cpu = time.process_time() - (cpu_at_measure if cpu_at_measure is not None else time.process_time())
    for slot in slots:
        slot.sock.close()
    sel.close()
    results.put((completed, errors, latencies, cpu))


def _wait_ready(workers, results, timeout_s=60.0):
    """Wait until every worker reports ready; RuntimeError if one fails or dies first."""
    ready, deadline = 0, time.monotonic() + timeout_s
    while ready < len(workers):
        try:
            state = results.get(timeout=0.2)
        except queue.Empty:
            dead = [w.name for w in workers if w.exitcode is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"load workers did not start: {dead or 'timeout'}") from None
            continue
        if state != "ready":
            raise RuntimeError(f"a load worker failed: {state}")
        ready += 1


def run_load(port, request, clients, duration_s, warmup_s=0.5, processes=2, on_window=None):
    """`clients` keep-alive connections sending `request` back to back for duration_s.

    Responses completed inside the window (after the warm-up) count, with their latency.
    `on_window(phase)` is called from this thread with "start" and "end" as the
    measuring window opens and closes (to read the servers' CPU time).
    """
    processes = max(1, min(processes, clients))
    ctx = multiprocessing.get_context("spawn")
    results, go = ctx.Queue(), ctx.Event()
    times = ctx.Array("q", 3)                 # start, measure, end (monotonic ns)
    shares = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    workers = [ctx.Process(target=_worker, name=f"bench-load-{i}",
                           args=(port, request, share, go, times, results))
               for i, share in enumerate(shares)]
    for worker in workers:
        worker.start()
    try:
        _wait_ready(workers, results)
        start_ns = time.monotonic_ns() + 20_000_000
        measure_ns = start_ns + int(warmup_s * 1e9)
        end_ns = measure_ns + int(duration_s * 1e9)
        times[:] = [start_ns, measure_ns, end_ns]
        go.set()
        if on_window is not None:
            for phase, at_ns in (("start", measure_ns), ("end", end_ns)):
                time.sleep(max(0, (at_ns - time.monotonic_ns()) / 1e9))
                on_window(phase)
        gathered = [results.get(timeout=duration_s + warmup_s + 60) for _ in workers]
    except BaseException:
        # Interrupted (SIGTERM, Ctrl-C, an error): a worker whose result nobody reads
        # would wait for ever to flush it into the queue, so end the workers now.
        for worker in workers:
            worker.terminate()
        raise
    finally:
        go.set()                              # a worker still waiting ends at once
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
                worker.join()
    latencies = sorted(v for _, _, lat, _ in gathered for v in lat)
    return LoadResult(clients, processes, duration_s, sum(g[0] for g in gathered),
                      sum(g[1] for g in gathered), latencies, sum(g[3] for g in gathered))


def hold_streams(port, request, count, on_tick=None, tick_s=0.1, timeout_s=60.0):
    """Open `count` streams at once and read them to the end in one selector loop.

    Returns (completed, errors, seconds). A stream counts as an error when it does not
    answer 200, is cut short, or does not end with message_stop. `on_tick()` is called
    about every tick_s while streams are open (to sample memory).
    """
    sel = selectors.DefaultSelector()
    bodies, errors, open_ = {}, 0, 0
    started = time.monotonic()
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(request)
            sock.setblocking(False)
        except OSError:
            errors += 1
            continue
        sel.register(sock, selectors.EVENT_READ, ResponseParser())
        bodies[sock] = []
        open_ += 1
    completed = 0
    next_tick = time.monotonic()
    while open_ and time.monotonic() - started < timeout_s:
        if on_tick is not None and time.monotonic() >= next_tick:
            on_tick()
            next_tick += tick_s
        for key, _ in sel.select(timeout=tick_s):
            sock, parser = key.fileobj, key.data
            data = b""
            try:
                data = sock.recv(RECV_SIZE)
                if data:
                    bodies[sock].append(parser.feed(data))
                else:
                    parser.eof()        # done for a close-delimited body, else ProtocolError
            except (OSError, ProtocolError):
                parser.status = None
                parser.done = True
            if parser.done:
                ok = parser.status == 200 and b"message_stop" in b"".join(bodies[sock])
                completed += ok
                errors += not ok
                sel.unregister(sock)
                sock.close()
                open_ -= 1
    for key in list(sel.get_map().values()):     # timed out: still open
        errors += 1
        key.fileobj.close()
    sel.close()
    return completed, errors, time.monotonic() - started
