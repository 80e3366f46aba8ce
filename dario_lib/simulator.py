"""A simulated Anthropic API upstream: the far end of dario in tests, benchmarks and the demo.

`Simulator` answers the routes dario relays (/v1/messages with and without SSE streaming,
/v1/messages/count_tokens, the legacy /v1/complete, the OpenAI-compatible
/v1/chat/completions and /v1/models) with the rate-limit headers the real API sends, and
records every request it receives so a test can check what the gateway forwarded.

Its behaviour is steered by knobs (see KNOBS, or `python -m dario_lib.simulator --help`):
server-wide defaults set from Python (`set_defaults`) or over HTTP (`POST /_sim/defaults`),
overridden per request by `x-sim-<knob>` headers (`x-sim-delay-ms: 5`). Knobs inject what
a gateway must survive: error statuses, redirects, slow or hanging responses, connections
closed, reset or stalled mid-response, junk bodies, every framing (Content-Length,
chunked, close-delimited), gzip. The `tool` and `tool_input` knobs drive a client's tool
loop for one round: a user turn is answered with a tool call, and the tool's result with
text quoting it (so Claude Code runs a real tool through the gateway).

It is also the "direct" baseline of dario's benchmarks, so the hot path is lean: requests
are parsed by hand rather than through email.parser, nothing is logged, and a response goes
out in one `sendall` (a stream in one per event).

Threading: the named thread `dario-simulator-<port>` runs serve_forever and each connection
gets a daemon thread. All shared state (recorded requests, disconnects, defaults, open
connections) lives on the Simulator behind one lock, and readers get snapshots. Defaults
are replaced, never mutated, so handlers read them without the lock. Every public method
is safe from any thread.
"""

import argparse
import collections
import contextlib
import dataclasses
import gzip
import json
import logging
import re
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs

log = logging.getLogger(__name__)

# Every knob: (name, default, meaning). The header that overrides it for one request is
# x-sim-<name with "-" for "_">; --help prints this table.
KNOBS = (
    # Rate-limit headers.
    ("claim", "five_hour", 'representative claim sent back; "none" sends no rate-limit headers'),
    ("status", "allowed", "anthropic-ratelimit-unified-status"),
    ("util5h", "0.12", "anthropic-ratelimit-unified-5h-utilization"),
    ("util7d", "0.34", "anthropic-ratelimit-unified-7d-utilization"),
    ("overage_util", "0.0", "anthropic-ratelimit-unified-overage-utilization"),
    ("overage_status", "rejected", "anthropic-ratelimit-unified-overage-status"),
    ("overage_in_use", "false", "anthropic-ratelimit-unified-overage-in-use"),
    ("windows", "{}", 'more rate-limit headers: a JSON object {window: {field: value}} (see "rate-limit '
                      'windows" below)'),
    # Content.
    ("events", 3, "text deltas per response (at most as many for a tool call); "
                  "output_tokens is twice this"),
    ("cache_read", 0, "cache_read_input_tokens reported in usage"),
    ("cache_create", 0, "cache_creation_input_tokens reported in usage"),
    ("model", "", 'the model reported back; "" echoes the request\'s'),
    ("timestamps", False, 'stamp each text event with "sim_ts" (monotonic ns at write)'),
    ("tool", "", "answer a user turn of /v1/messages with a tool_use block calling this tool"),
    ("tool_input", "{}", "the tool call's input: a JSON object (in a header, its JSON text)"),
    # Timing.
    ("delay_ms", 0, "pause before each text event and before the closing events of a stream"),
    ("headers_delay_ms", 0, "pause before the status line"),
    ("hang_s", 30.0, "how long fail=hang_mid_stream stalls"),
    # Transport and failures.
    ("framing", "", '"" (chunked for streams, Content-Length for JSON), chunked, length or close'),
    ("gzip", False, "gzip the body (Content-Encoding: gzip)"),
    ("http_status", 200, "any other status answers an Anthropic-shaped error with it"),
    ("fail", "", "garbage_sse, redirect, die_mid_stream, reset_mid_stream or hang_mid_stream"),
    ("location", "http://127.0.0.1:9/elsewhere", "where fail=redirect points"),
)
DEFAULTS = {name: default for name, default, _ in KNOBS}
FRAMINGS = ("", "chunked", "length", "close")
MID_RESPONSE_FAILS = ("die_mid_stream", "reset_mid_stream", "hang_mid_stream")
FAILS = ("", "garbage_sse", "redirect") + MID_RESPONSE_FAILS

DEFAULT_MODEL = "claude-sonnet-4-5"
MODELS = [  # newest first, as the real API lists them
    {"type": "model", "id": "claude-haiku-4-5", "display_name": "Claude Haiku 4.5",
     "created_at": "2025-10-01T00:00:00Z"},
    {"type": "model", "id": "claude-sonnet-4-5", "display_name": "Claude Sonnet 4.5",
     "created_at": "2025-09-29T00:00:00Z"},
    {"type": "model", "id": "claude-opus-4-1", "display_name": "Claude Opus 4.1",
     "created_at": "2025-08-05T00:00:00Z"},
]

MAX_RECORDED = 100_000  # requests and disconnects kept, so long benchmarks stay bounded
MAX_BODY = 64 * 1024  # recorded bodies are truncated to this; body_len keeps the true length
MAX_LINE = 65536
MAX_HEADERS = 200
IDLE_TIMEOUT_S = 120  # also bounds a write to a peer that stopped reading

_TRUE = frozenset({"1", "true", "yes", "on"})
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 529: "overloaded_error",
}
_REASONS = {code: phrase for code, (phrase, _) in BaseHTTPRequestHandler.responses.items()}
_REASONS[529] = "Overloaded"
_JSON = "application/json"
_SSE = "text/event-stream"
# One encoder for all: json.dumps() with keyword arguments builds a new one per call.
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _sse(name, data):
    return f"event: {name}\ndata: {_dumps(data)}\n\n".encode()


_BLOCK_START = _sse("content_block_start",
                    {"type": "content_block_start", "index": 0,
                     "content_block": {"type": "text", "text": ""}})
_PING = _sse("ping", {"type": "ping"})
_BLOCK_STOP = _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
_MESSAGE_STOP = _sse("message_stop", {"type": "message_stop"})
_GARBAGE = [b"\x00\xff\xfe<html><body>502 this is not server-sent events</body></html>\r\n",
            b"\x1b[2J{{{ \"half\": a json objec\n\x89PNG\r\n\x1a\n"]


@dataclasses.dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One API request as the simulator received it."""

    seq: int  # from 1, in arrival order
    method: str
    path: str  # without the query
    query: str  # "" if none
    headers: list  # (name, value) exactly as received: original case, order, duplicates
    body: bytes  # at most MAX_BODY bytes
    arrived_ns: int  # time.monotonic_ns() when the request line was read
    body_len: int  # the true length of the body

    def header(self, name):
        """The first value of header `name` (any case), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key.lower() == name), None)


@dataclasses.dataclass(frozen=True, slots=True)
class Disconnect:
    """A client hung up (or stopped reading) before its response was complete."""

    seq: int  # the request's seq
    at_ns: int  # time.monotonic_ns() when the write failed or the hang-up was seen
    events_sent: int  # body pieces (SSE events) fully written before that


def _coerce(knob, value):
    """Parse a knob value from a header string or JSON; ValueError if it is not valid."""
    if knob not in DEFAULTS:
        raise ValueError(f"unknown simulator knob {knob!r}")
    kind = type(DEFAULTS[knob])
    if kind is bool:
        return value if isinstance(value, bool) else str(value).strip().lower() in _TRUE
    if kind in (int, float):
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"knob {knob} wants a number, not {value!r}") from None
        if number < 0 or (knob == "http_status" and not 200 <= number <= 599):
            raise ValueError(f"knob {knob} is out of range: {number}")
        return number
    if knob == "tool_input":
        return _tool_input(value)
    if knob == "windows":
        return _windows(value)
    text = str(value).strip()
    if "\r" in text or "\n" in text:  # these values end up in response headers
        raise ValueError(f"knob {knob} must be one line")
    allowed = FRAMINGS if knob == "framing" else FAILS if knob == "fail" else None
    if allowed and text not in allowed:
        raise ValueError(f"knob {knob} must be one of {', '.join(allowed[1:])} or empty")
    return text


def _tool_input(value):
    """The knob tool_input as compact JSON text: from a dict, or from text holding an object."""
    parsed = value
    if not isinstance(value, dict):
        with contextlib.suppress(ValueError):  # not JSON: refused below like any non-object
            parsed = json.loads(str(value))
    if not isinstance(parsed, dict):
        raise ValueError(f"knob tool_input wants a JSON object, not {value!r}")
    return _dumps(parsed)


_HEADER_PART = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _windows(value):
    """The knob windows as compact JSON text: {window: {field: value}}, from a dict or its
    JSON text. Names are header-name tokens and values one line: they become headers."""
    parsed = value
    if not isinstance(value, dict):
        with contextlib.suppress(ValueError):  # not JSON: refused below like any non-object
            parsed = json.loads(str(value))
    wanted = 'a JSON object like {"7d_sonnet": {"utilization": "0.5", "status": "allowed"}}'
    if not isinstance(parsed, dict):
        raise ValueError(f"knob windows wants {wanted}, not {value!r}")
    out = {}
    for window, fields in parsed.items():
        if not _HEADER_PART.fullmatch(window) or not isinstance(fields, dict):
            raise ValueError(f"knob windows wants {wanted}, not {value!r}")
        out[window] = {}
        for field, text in fields.items():
            if (not _HEADER_PART.fullmatch(field) or isinstance(text, bool)
                    or not isinstance(text, (str, int, float)) or re.search(r"[\r\n]", str(text))):
                raise ValueError(f"knob windows wants {wanted}, not {value!r}")
            out[window][field] = str(text)
    return _dumps(out)


def _merged(base, updates):
    merged = dict(base)
    for knob, value in updates:
        merged[knob] = _coerce(knob, value)
    return merged


class Simulator:
    """A fake Anthropic API on a local port. Use as a context manager or start()/stop()."""

    def __init__(self, host="127.0.0.1", port=0, **defaults):
        self._address = (host, port)
        self._initial = _merged(DEFAULTS, defaults.items())
        self._defaults = self._initial
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a request, disconnect or hang-up
        self._requests = collections.deque(maxlen=MAX_RECORDED)
        self._disconnects = collections.deque(maxlen=MAX_RECORDED)
        self._seq = 0
        self._conns = set()
        self._stopping = threading.Event()  # ends pauses and hangs promptly on stop()
        self._server = None
        self._thread = None
        self.port = port
        self.url = None

    def start(self):
        """Bind and serve in a daemon thread; returns self, already accepting connections."""
        self._stopping.clear()
        self._server = _Server(self._address, _Handler)
        self._server.sim = self
        host, self.port = self._server.server_address[:2]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"dario-simulator-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving and hang up on every open connection, keep-alive or mid-response."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        self._thread.join()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):  # its handler may have closed it already
                conn.shutdown(socket.SHUT_RDWR)
        with self._changed:  # handlers notice within milliseconds; don't wait on a stuck one
            self._changed.wait_for(lambda: not self._conns, timeout=2.0)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def defaults(self):
        return dict(self._defaults)

    def set_defaults(self, **knobs):
        """Merge knobs into the server-wide defaults; ValueError on unknown knobs or bad values."""
        self._update_defaults(knobs.items())

    def _update_defaults(self, updates):
        with self._lock:
            self._defaults = _merged(self._defaults, updates)
            return dict(self._defaults)

    def reset(self):
        """Forget recorded requests and disconnects and restore the defaults given at creation.

        Sequence numbers keep counting, so request ids stay unique for the process.
        """
        with self._lock:
            self._requests.clear()
            self._disconnects.clear()
            self._defaults = self._initial

    @property
    def requests(self):
        with self._lock:
            return list(self._requests)

    @property
    def disconnects(self):
        with self._lock:
            return list(self._disconnects)

    def wait_for_requests(self, n, timeout=5.0):
        """True once at least n requests are recorded, False if timeout passes first."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._requests) >= n, timeout)

    def wait_for_disconnect(self, timeout=5.0):
        with self._changed:
            return self._changed.wait_for(lambda: len(self._disconnects) > 0, timeout)

    # Called from handler threads.

    def _record(self, method, target, headers, body, arrived_ns):
        path, _, query = target.partition("?")
        with self._lock:
            self._seq += 1
            req = ReceivedRequest(self._seq, method, path, query, headers, body[:MAX_BODY],
                                  arrived_ns, len(body))
            self._requests.append(req)
            self._changed.notify_all()
        return req

    def _record_disconnect(self, seq, events_sent):
        with self._lock:
            self._disconnects.append(Disconnect(seq, time.monotonic_ns(), events_sent))
            self._changed.notify_all()

    def _track(self, conn, open_):
        with self._lock:
            if not open_:
                self._conns.discard(conn)
                self._changed.notify_all()
            elif self._stopping.is_set():  # accepted just as stop() took its snapshot
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            else:
                self._conns.add(conn)


class _Server(socketserver.ThreadingTCPServer):
    # Not http.server.HTTPServer: its server_bind() resolves an FQDN, which can take seconds.
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024  # the default backlog of 5 resets connections under a benchmark

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("connection from %s failed", client_address, exc_info=True)
        else:
            log.exception("simulator handler failed for %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    """Serves one connection; `req` and `knobs` describe the request being answered."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes for streams
    timeout = IDLE_TIMEOUT_S

    def setup(self):
        super().setup()
        self.sim = self.server.sim
        self.sim._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.sim._track(self.connection, False)

    def log_message(self, format, *args):
        log.debug("%s " + format, self.address_string(), *args)

    # Reading requests.

    def handle_one_request(self):
        self.close_connection = True  # until a request parses and allows keep-alive
        try:
            line = self.rfile.readline(MAX_LINE + 1)
            if not line:
                return
            arrived_ns = time.monotonic_ns()
            method, target, headers, body = self._read_request(line)
        except OSError:  # the peer left, or an idle keep-alive connection timed out
            return
        except ValueError as exc:
            self.close_connection = True  # where the next request would start is unknown
            self._reply(400, _error("invalid_request_error", f"malformed request: {exc}"))
            return
        if target.startswith("/_sim/"):
            self._control(method, target, body)
            return
        self.req = self.sim._record(method, target, headers, body, arrived_ns)
        self.knobs = self.sim._defaults
        self.events_sent = 0
        try:
            self._api(body)
        except OSError:  # the client hung up, or stop() hung up on it
            self.close_connection = True
            if not self.sim._stopping.is_set():
                self.sim._record_disconnect(self.req.seq, self.events_sent)

    def _read_request(self, line):
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or len(line) > MAX_LINE:
            raise ValueError("bad request line")
        method, target, version = parts
        headers, first = [], {}  # first: lower-cased name -> first value
        while (raw := self.rfile.readline(MAX_LINE + 1)) not in (b"\r\n", b"\n"):
            if not raw:
                raise ConnectionAbortedError("peer closed inside the headers")
            name, colon, value = raw.decode("latin-1").partition(":")
            if not colon or len(headers) >= MAX_HEADERS:
                raise ValueError("bad header line")
            headers.append((name, value.strip()))
            first.setdefault(name.lower(), value.strip())
        connection = first.get("connection", "").lower()
        self.close_connection = connection == "close" or (
            version != "HTTP/1.1" and connection != "keep-alive")
        if first.get("expect", "").lower() == "100-continue":
            self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in first.get("transfer-encoding", "").lower():
            return method, target, headers, self._read_chunked()
        length = int(first.get("content-length", 0))
        if length < 0:
            raise ValueError("negative content-length")
        return method, target, headers, self._read_exactly(length)

    def _read_chunked(self):
        parts = []
        while size := self._chunk_size():
            parts.append(self._read_exactly(size + 2)[:size])  # the data and its CRLF
        # Skip any trailer fields up to the empty line that ends the body.
        while self.rfile.readline(MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
            continue
        return b"".join(parts)

    def _chunk_size(self):
        line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            raise ConnectionAbortedError("peer closed inside the body")
        size = int(line.split(b";", 1)[0], 16)  # a chunk extension may follow the ";"
        if size < 0:
            raise ValueError("negative chunk size")
        return size

    def _read_exactly(self, n):
        data = self.rfile.read(n)
        if len(data) < n:
            raise ConnectionAbortedError("peer closed inside the body")
        return data

    # Control endpoints: driven by other processes, never recorded.

    def _control(self, method, target, body):
        path, _, query = target.partition("?")
        sim = self.sim
        try:
            if (method, path) == ("POST", "/_sim/defaults"):
                updates = _json_object(body or b"{}")
                if updates is None:
                    raise ValueError("expected a JSON object of knobs")
                return self._reply(200, sim._update_defaults(updates.items()))
            if (method, path) == ("POST", "/_sim/reset"):
                sim.reset()
                return self._reply(200, {})
            if (method, path) == ("GET", "/_sim/requests"):
                since = int(parse_qs(query).get("since", ["0"])[0])
                return self._reply(200, {"requests": [
                    {"seq": r.seq, "method": r.method, "path": r.path,
                     "arrived_ns": r.arrived_ns, "id": r.header("x-req-id")}
                    for r in sim.requests if r.seq > since]})
            if (method, path) == ("GET", "/_sim/disconnects"):
                return self._reply(200, [dataclasses.asdict(d) for d in sim.disconnects])
        except ValueError as exc:
            return self._reply(400, _error("invalid_request_error", str(exc)))
        self._reply(404, _error("not_found_error", f"no simulator control {method} {path}"))

    def _reply(self, status, obj):
        body = _dumps(obj).encode()
        close = "connection: close\r\n" if self.close_connection else ""
        self.connection.sendall(
            f"{self.protocol_version} {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"content-type: {_JSON}\r\ncontent-length: {len(body)}\r\n{close}\r\n"
            .encode() + body)

    # The API.

    def _api(self, raw_body):
        req = self.req
        overrides = [(name[6:].lower().replace("-", "_"), value)
                     for name, value in req.headers if name[:6].lower() == "x-sim-"]
        if overrides:
            try:
                self.knobs = _merged(self.knobs, overrides)
            except ValueError as exc:
                return self._send_error(400, str(exc))
        knobs = self.knobs
        if knobs["headers_delay_ms"]:
            self._pause(knobs["headers_delay_ms"] / 1000)
        route = self.routes.get((req.method, req.path))
        if route is None and req.method == "GET" and req.path.startswith("/v1/models/"):
            route = _Handler._model
        if route is None:
            return self._send_error(404, f"Not found: {req.method} {req.path}")
        if knobs["fail"] == "redirect":
            return self._send(307, "text/plain", [], extra=f"location: {knobs['location']}\r\n")
        if knobs["http_status"] != 200:
            status = knobs["http_status"]
            return self._send_error(status, _REASONS.get(status, "Error"))
        if knobs["fail"] == "garbage_sse":
            return self._send(200, _SSE, _GARBAGE, stream=True)
        body = None
        if req.method == "POST":
            body = _json_object(raw_body)
            if body is None:
                return self._send_error(400, "request body must be a JSON object")
            self.model = knobs["model"] or body.get("model") or DEFAULT_MODEL
        route(self, body)

    def _messages(self, body):
        knobs = self.knobs
        n = knobs["events"]
        block, pieces = self._content(body, n)
        usage = {"input_tokens": _input_tokens(self.req), "output_tokens": 2 * n,
                 "cache_read_input_tokens": knobs["cache_read"],
                 "cache_creation_input_tokens": knobs["cache_create"]}
        stop_reason = "tool_use" if block["type"] == "tool_use" else "end_turn"
        message = {"id": f"msg_sim_{self.req.seq}", "type": "message", "role": "assistant",
                   "model": self.model, "content": [block],
                   "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            return self._send_json(message)
        # The cut comes after message_start, content_block_start, ping and half the deltas.
        self._send(200, _SSE, self._message_events(message, pieces), stream=True,
                   cut_after=3 + len(pieces) // 2)

    def _content(self, body, n):
        """The answer's one content block, and the pieces a stream sends it in.

        A tool_result in the last turn is answered with text quoting it; otherwise, with the
        tool knob set, a user turn is answered with a call of that tool (so a client's tool
        loop runs one round); anything else gets n words.
        """
        last = _last_turn(body)
        result = _tool_result_text(last)
        if result is not None:
            text = f"The tool returned: {result[:200]}"
            return {"type": "text", "text": text}, _split(text, n)
        tool = self.knobs["tool"]
        if tool and last is not None and last.get("role") == "user":
            arguments = self.knobs["tool_input"]
            block = {"type": "tool_use", "id": f"toolu_sim_{self.req.seq}", "name": tool,
                     "input": json.loads(arguments)}
            return block, _split(arguments, n)
        return {"type": "text", "text": _text(n)}, [f"word{k} " for k in range(1, n + 1)]

    def _message_events(self, message, pieces):
        start = dict(message, content=[], stop_reason=None,
                     usage=dict(message["usage"], output_tokens=1))
        block = message["content"][0]
        yield _sse("message_start", {"type": "message_start", "message": start})
        if block["type"] == "tool_use":
            # As the API streams a tool call: the block starts with an empty input, which
            # then arrives as pieces of JSON text.
            yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": dict(block, input={})})
            kind, key = "input_json_delta", "partial_json"
        else:
            yield _BLOCK_START
            kind, key = "text_delta", "text"
        yield _PING
        for piece in pieces:
            self._delay()
            yield _sse("content_block_delta", self._stamped({
                "type": "content_block_delta", "index": 0, "delta": {"type": kind, key: piece}}))
        yield _BLOCK_STOP
        self._delay()
        yield _sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": message["usage"]["output_tokens"]}})
        yield _MESSAGE_STOP

    def _count_tokens(self, body):
        self._send_json({"input_tokens": _input_tokens(self.req)})

    def _complete(self, body):
        n = self.knobs["events"]
        completion = {"type": "completion", "id": f"compl_sim_{self.req.seq}",
                      "completion": _text(n), "stop_reason": "stop_sequence", "model": self.model}
        if not body.get("stream"):
            return self._send_json(completion)
        self._send(200, _SSE, self._completion_events(completion), stream=True, cut_after=n // 2)

    def _completion_events(self, completion):
        for k in range(1, self.knobs["events"] + 1):
            self._delay()
            yield _sse("completion", self._stamped(
                dict(completion, completion=f"word{k} ", stop_reason=None)))
        self._delay()
        yield _sse("completion", dict(completion, completion=""))

    def _chat(self, body):
        n, prompt = self.knobs["events"], _input_tokens(self.req)
        chat = {"id": f"chatcmpl-sim-{self.req.seq}", "object": "chat.completion",
                "created": int(time.time()), "model": self.model}
        usage = {"prompt_tokens": prompt, "completion_tokens": 2 * n,
                 "total_tokens": prompt + 2 * n}
        if not body.get("stream"):
            return self._send_json(dict(chat, usage=usage, choices=[{
                "index": 0, "message": {"role": "assistant", "content": _text(n)},
                "finish_reason": "stop"}]))
        options = body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage")):
            usage = None
        chat["object"] = "chat.completion.chunk"
        self._send(200, _SSE, self._chat_events(chat, usage), stream=True, cut_after=1 + n // 2)

    def _chat_events(self, chat, usage):
        def chunk(delta, finish_reason=None):
            return dict(chat, choices=[
                {"index": 0, "delta": delta, "finish_reason": finish_reason}])

        def data(obj):
            return f"data: {_dumps(obj)}\n\n".encode()

        yield data(chunk({"role": "assistant", "content": ""}))
        for k in range(1, self.knobs["events"] + 1):
            self._delay()
            yield data(self._stamped(chunk({"content": f"word{k} "})))
        self._delay()
        yield data(chunk({}, "stop"))
        if usage:
            yield data(dict(chat, choices=[], usage=usage))
        yield b"data: [DONE]\n\n"

    def _models(self, body):
        self._send_json({"data": MODELS, "has_more": False,
                         "first_id": MODELS[0]["id"], "last_id": MODELS[-1]["id"]})

    def _model(self, body):
        model_id = self.req.path[len("/v1/models/"):]
        model = next((m for m in MODELS if m["id"] == model_id), None)
        if model is None:
            return self._send_error(404, f"model: {model_id}")
        self._send_json(model)

    routes = {
        ("POST", "/v1/messages"): _messages,
        ("POST", "/v1/messages/count_tokens"): _count_tokens,
        ("POST", "/v1/complete"): _complete,
        ("POST", "/v1/chat/completions"): _chat,
        ("GET", "/v1/models"): _models,
    }

    # Writing responses.

    def _send_json(self, obj):
        # Two pieces, so that a mid-response failure can cut a JSON body in half.
        body = _dumps(obj).encode()
        half = len(body) // 2
        self._send(200, _JSON, [body[:half], body[half:]], cut_after=1)

    def _send_error(self, status, message):
        error = _error(_ERROR_TYPES.get(status, "api_error"), message)
        self._send(status, _JSON, [_dumps(error).encode()])

    def _send(self, status, ctype, pieces, *, stream=False, cut_after=None, extra=""):
        """Write a response: the head, then each piece of the body as its own write.

        Each piece of a stream is one event. A mid-response `fail` knob strikes after
        `cut_after` pieces (after half the bytes for Content-Length framing, where the whole
        body is built before the head, so stream delays pass before the status line).
        """
        knobs, sendall = self.knobs, self.connection.sendall
        framing = knobs["framing"] or ("chunked" if stream else "length")
        fail = knobs["fail"] if cut_after is not None else ""
        fail = fail if fail in MID_RESPONSE_FAILS else ""
        if framing == "length":
            pieces = list(pieces)
            body = b"".join(pieces)
            if knobs["gzip"]:
                body = gzip.compress(body)
            head = self._head(status, ctype, f"content-length: {len(body)}", extra)
            if fail:
                half = len(body) // 2
                sendall(head + body[:half])
                if not self._fail(fail):
                    return
                head, body = b"", body[half:]
            sendall(head + body)
            self.events_sent = len(pieces)
            return

        chunked = framing == "chunked"
        if not chunked:
            self.close_connection = True  # the body ends when the socket closes
        out = self._head(status, ctype,
                         "transfer-encoding: chunked" if chunked else "connection: close", extra)
        # wbits=31 makes a gzip stream; a sync flush makes each event decodable on arrival.
        gz = zlib.compressobj(wbits=31) if knobs["gzip"] else None
        for piece in pieces:
            if fail and self.events_sent == cut_after:
                sendall(out)
                out = b""
                if not self._fail(fail):
                    return
                fail = ""
            if gz:
                piece = gz.compress(piece) + gz.flush(zlib.Z_SYNC_FLUSH)
            sendall(out + (b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece))
            out = b""
            self.events_sent += 1
        tail = gz.flush() if gz else b""
        if chunked:
            tail = (b"%x\r\n%s\r\n" % (len(tail), tail) if tail else b"") + b"0\r\n\r\n"
        if out or tail:
            sendall(out + tail)

    def _head(self, status, ctype, framing_header, extra):
        knobs = self.knobs
        head = (f"{self.protocol_version} {status} {_REASONS.get(status, 'Unknown')}\r\n"
                f"content-type: {ctype}\r\nrequest-id: req_sim_{self.req.seq}\r\n"
                f"{framing_header}\r\n{extra}")
        if knobs["gzip"]:
            head += "content-encoding: gzip\r\n"
        if self.close_connection and framing_header != "connection: close":
            head += "connection: close\r\n"
        if knobs["claim"] != "none":
            prefix = "anthropic-ratelimit-unified-"
            head += (
                f"{prefix}status: {knobs['status']}\r\n"
                f"{prefix}representative-claim: {knobs['claim']}\r\n"
                f"{prefix}5h-utilization: {knobs['util5h']}\r\n"
                f"{prefix}7d-utilization: {knobs['util7d']}\r\n"
                f"{prefix}overage-utilization: {knobs['overage_util']}\r\n"
                f"{prefix}overage-status: {knobs['overage_status']}\r\n"
                f"{prefix}overage-in-use: {knobs['overage_in_use']}\r\n"
                f"{prefix}reset: {int(time.time()) + 3600}\r\n"
                f"{prefix}fallback-percentage: 0.5\r\n")
            if knobs["windows"] != "{}":
                head += "".join(f"{prefix}{window}-{field}: {text}\r\n"
                                for window, fields in json.loads(knobs["windows"]).items()
                                for field, text in fields.items())
        return (head + "\r\n").encode("latin-1")

    def _fail(self, fail):
        """Carry out a mid-response failure; True if the response should go on after all."""
        if fail == "hang_mid_stream":
            self._pause(self.knobs["hang_s"])  # raises if the peer hangs up meanwhile
            return True
        if fail == "reset_mid_stream":
            # Lingering with a zero timeout makes close() send a RST instead of a FIN.
            linger = struct.pack("ii", 1, 0)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        self.close_connection = True
        # The descriptor closes only once the makefile() streams over it are closed too.
        self.rfile.close()
        self.wfile.close()
        self.connection.close()
        return False

    def _delay(self):
        if self.knobs["delay_ms"]:
            self._pause(self.knobs["delay_ms"] / 1000)

    def _stamped(self, data):
        if self.knobs["timestamps"]:
            data["sim_ts"] = time.monotonic_ns()  # taken as late as possible before the write
        return data

    def _pause(self, seconds):
        """Sleep; raise ConnectionAbortedError as soon as the peer hangs up or stop() is called.

        Watching the socket, not just the clock, lets a test see a gateway give up on a
        hanging upstream without waiting out the hang.
        """
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self.sim._stopping.is_set():
                raise ConnectionAbortedError("simulator stopping")
            readable, _, _ = select.select([self.connection], [], [], min(remaining, 0.05))
            if readable:
                if not self.connection.recv(1, socket.MSG_PEEK):
                    raise ConnectionAbortedError("peer closed the connection")
                # The peer sent more (a pipelined request), so EOF can't be seen: just wait.
                self.sim._stopping.wait(remaining)


def _error(error_type, message):
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _json_object(raw):
    """The JSON object in raw, or None if it is not JSON or not an object."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _input_tokens(req):
    return max(1, req.body_len // 4)


def _text(n):
    return "".join(f"word{k} " for k in range(1, n + 1))


def _split(text, n):
    """text cut into at most n pieces (one when n is 0) that join back to it."""
    n = max(1, n)
    size = -(-len(text) // n) or 1
    return [text[i:i + size] for i in range(0, len(text), size)] or [text]


def _last_turn(body):
    """The request's last user or assistant message, or None.

    Messages with role "system" after it are skipped: Claude Code ends its requests with
    one (per-turn instructions) after the user's turn.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") != "system":
            return message
    return None


def _tool_result_text(message):
    """The text of the first tool_result block in message, or None if it carries none.

    A result's content is a string or a list of blocks, of which the text ones count.
    """
    content = message.get("content") if message is not None else None
    if not isinstance(content, list):
        return None
    for block in content:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            result = block.get("content", "")
            if isinstance(result, list):
                texts = (part.get("text") for part in result
                         if isinstance(part, dict) and part.get("type") == "text")
                result = "".join(text for text in texts if isinstance(text, str))
            return result if isinstance(result, str) else ""
    return None


def _help_epilog():
    """--help's reference: every knob with its header and default, the tool loop, /_sim/*."""
    lines = ["knobs: server-wide with Simulator(**knobs), set_defaults() or POST /_sim/defaults;",
             "for one request with the header x-sim-<knob>, \"_\" written \"-\":", ""]
    for name, default, meaning in KNOBS:
        header = "x-sim-" + name.replace("_", "-")
        lines.append(f"  {header}  (knob {name}, default {json.dumps(default)})")
        lines.append(f"      {meaning}")
    lines += [
        "",
        "tool loop (Claude Code passes headers through ANTHROPIC_CUSTOM_HEADERS,",
        "one \"Name: value\" per line):",
        "  x-sim-tool: NAME and x-sim-tool-input: {\"json\": \"object\"}  a POST /v1/messages",
        "      whose last turn is a user message without a tool_result block (trailing",
        "      \"system\" messages are skipped) is answered with one tool_use block calling NAME",
        "      with that input, stop_reason \"tool_use\", streamed or not",
        "  a request whose last turn carries a tool_result block is answered with text",
        "      quoting the first 200 characters of that result, with or without the headers",
        "",
        "rate-limit windows:",
        "  x-sim-windows: {\"7d_sonnet\": {\"utilization\": \"0.5\", \"status\": \"allowed\", \"reset\": \"1790000000\"}}",
        "      adds anthropic-ratelimit-unified-7d_sonnet-utilization: 0.5, ...-7d_sonnet-status:",
        "      allowed and ...-7d_sonnet-reset: 1790000000 to the answer (not with claim \"none\").",
        "      Any window and field name (letters, digits, _ and -) goes, so {\"overage\":",
        "      {\"disabled-reason\": \"out_of_credits\"}} sends ...-overage-disabled-reason; the 5h",
        "      and 7d utilization headers come from util5h and util7d",
        "",
        "control endpoints (never recorded as requests):",
        "  POST /_sim/defaults          merge a JSON object of knobs into the defaults;",
        "                               answers the defaults now in force",
        "  POST /_sim/reset             forget recorded requests and disconnects and restore",
        "                               the defaults given at start",
        "  GET  /_sim/requests?since=N  requests received after sequence number N:",
        "                               seq, method, path, arrived_ns, id (x-req-id)",
        "  GET  /_sim/disconnects       clients that hung up mid-response:",
        "                               seq, at_ns, events_sent",
        "",
        "routes: POST /v1/messages (stream or not), POST /v1/messages/count_tokens,",
        "POST /v1/complete, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id}.",
        "On start the simulator prints one line, SIMULATOR_URL http://HOST:PORT; it serves",
        "until SIGTERM or SIGINT.",
    ]
    return "\n".join(lines)


def main(argv=None):
    """Serve until SIGTERM or SIGINT; print the URL as one line for the parent process."""
    parser = argparse.ArgumentParser(prog="python -m dario_lib.simulator",
                                     description="Simulated Anthropic API upstream.",
                                     epilog=_help_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--claim", default=DEFAULTS["claim"],
                        help="default representative claim; 'none' sends no rate-limit headers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    with Simulator(args.host, args.port, claim=args.claim) as sim:
        sys.stdout.write(f"SIMULATOR_URL {sim.url}\n")
        sys.stdout.flush()
        done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
