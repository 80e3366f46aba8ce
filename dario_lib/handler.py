"""The request handler: checks, the route table, and the gateway's own endpoints.

Every request goes through the same gate, in this order: request-target form, Host
(DNS rebinding), browser origin, API key; then the route table. The gateway's own
endpoints (`/health`, `/status`, `/analytics`, `/analytics/stream`, `/admin/resume`)
are answered here; the forwarded API routes go to `relay.Exchange`.

Anything the gateway answers itself is an Anthropic-shaped JSON error, decided before
the first byte is written. When it answers before reading a request's whole body, the
connection is closed, so unread body bytes can never be parsed as a next request.
Client disconnects are debug lines, never tracebacks.

One instance per connection, on that connection's thread (ThreadingHTTPServer).
"""

import json
import logging
import re
import socket
import time
from http.server import BaseHTTPRequestHandler

from . import __version__, analytics, exposure, headers, metrics, wire
from .events import Subscription, TooManySubscribers
from .guard import ALL, iso
from .relay import Exchange

log = logging.getLogger(__name__)

HEAD_DEADLINE_S = 75          # idle keep-alive wait plus request line and headers
BODY_DEADLINE_S = 60          # plus one second per 256 KiB declared
SOCKET_TIMEOUT_S = 60         # any single read or write on the client socket
SSE_WRITE_TIMEOUT_S = 10
SSE_SEND_BUFFER = 65536
ADMIN_BODY_LIMIT = 65536

FORWARDED = {
    "/v1/messages": "POST",
    "/v1/messages/count_tokens": "POST",
    "/v1/complete": "POST",
    "/v1/chat/completions": "POST",
    "/v1/models": "GET",
}
_MODEL_PATH = re.compile(r"/v1/models/[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
LOCAL = {
    ("GET", "/health"): "health",
    ("GET", "/status"): "status",
    ("GET", "/analytics"): "analytics",
    ("GET", "/analytics/stream"): "analytics_stream",
    ("GET", "/admin/resume"): "resume_state",
    ("POST", "/admin/resume"): "resume",
    ("GET", "/metrics"): "metrics",
}
LOCAL_PATHS = {path for _, path in LOCAL}


def forwarded_method(path):
    """The method a forwarded route takes, or None when the path is not forwarded."""
    method = FORWARDED.get(path)
    if method is None and _MODEL_PATH.fullmatch(path):
        method = "GET"
    return method


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True     # headers and body are separate writes: no 40 ms ACK wait
    server_version = "dario/" + __version__
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S

    # -- the connection loop -----------------------------------------------------

    def setup(self):
        super().setup()
        self.slot = self.server.watchdog.register(self.connection)   # deadlines, hang-up watch

    def finish(self):
        self.server.watchdog.unregister(self.slot)
        super().finish()

    def handle_one_request(self):
        self.body_pending = False
        self.responded = False
        self.forward_path = None
        self.expect_continue = False
        self.path = ""                  # log_request() runs even when the request line is refused
        self.slot.arm(HEAD_DEADLINE_S)
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if self.raw_requestline in (b"\r\n", b"\n"):   # RFC 9112: tolerate one empty line
                self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline or self.raw_requestline in (b"\r\n", b"\n"):
                self.close_connection = True
                return
            if len(self.raw_requestline) > 65536:
                self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
                self.headers = headers.Headers()
                self.send_error(414, "request line too long")
                return
            if not self.parse_request():
                return
        except OSError as err:
            log.debug("connection dropped before a request arrived: %s", err)
            self.close_connection = True
            return
        finally:
            self.slot.disarm()
        self.started = time.monotonic()
        self.started_ms = int(self.server.clock() * 1000)
        try:
            self.dispatch()
        except OSError as err:
            log.debug("client connection lost during %s %s: %s", self.command, self.path, err)
            self.close_connection = True
        except Exception:
            log.exception("internal error while serving %s %s", self.command, self.path)
            self.close_connection = True
            if not self.responded:
                try:
                    self.send_bytes(500, wire.error_body("api_error", "internal error in dario; see its log"))
                except OSError:
                    pass

    def parse_request(self):
        """Parse the request line and headers (see `headers`); answers and closes on errors."""
        self.command, self.request_version, self.headers = "", "HTTP/1.1", headers.Headers()
        self.requestline = self.raw_requestline.rstrip(b"\r\n").decode("latin-1")
        try:
            self.command, self.path, self.request_version = headers.parse_request_line(self.raw_requestline)
            self.headers = headers.read_headers(self.rfile)
        except headers.HeadError as err:
            self.send_error(err.status, err.message)
            return False
        self.hop_tokens = tokens = wire.connection_tokens(self.headers)   # relay reuses them
        if "close" in tokens or (self.request_version == "HTTP/1.0" and "keep-alive" not in tokens):
            self.close_connection = True
        else:
            self.close_connection = False
        # Asked-for `100 Continue` goes out only once the request passed every check and its
        # body is about to be read (read_body), so a refused client never uploads for nothing.
        self.expect_continue = ((self.headers.get("Expect") or "").lower() == "100-continue"
                                and self.request_version == "HTTP/1.1")
        return True

    def dispatch(self):
        method, target = self.command, self.path
        path, _, query = target.partition("?")
        if target.startswith("/") and forwarded_method(path):
            self.forward_path = path
        settings = self.server.settings
        self.body_pending = True        # until the framing says there is no body
        try:
            framing = wire.body_framing(self.headers, settings.max_body_bytes)
            self.body_pending = framing[0] != "none"
            if not target.startswith("/"):
                raise wire.HttpError(400, "the request target must be a path starting with /")
            exposure.check_host(settings, self.headers)
            public = method == "GET" and path == "/health"
            if not public:
                exposure.check_browser(settings, self.headers)
            if method == "OPTIONS":
                self.preflight()
                return
            if not public:
                exposure.check_key(settings, self.headers)
            if self.server.draining and not public:
                raise wire.HttpError(503, "dario is shutting down")
            name = LOCAL.get((method, path))
            if name is not None:
                getattr(self, "do_" + name)()
                return
            expected = forwarded_method(path)
            if expected is None:
                if path in LOCAL_PATHS:
                    raise wire.HttpError(405, f"{method} is not allowed on {path}")
                raise wire.HttpError(404, f"no such endpoint: {path}")
            if method != expected:
                raise wire.HttpError(405, f"{method} is not allowed on {path}; use {expected}")
            body = self.read_body(framing)
            with self.server.tracker:
                Exchange(self, path, query, body).run()
        except wire.HttpError as err:
            self.answer_error(err)

    # -- reading -----------------------------------------------------------------

    def read_body(self, framing, limit=None):
        kind, length = framing
        limit = limit or self.server.settings.max_body_bytes
        if kind == "length" and length > limit:
            raise wire.HttpError(413, f"request body over the {limit}-byte limit")
        deadline = BODY_DEADLINE_S + (length if kind == "length" else limit) / 262144
        if self.expect_continue and kind != "none":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.expect_continue = False
        self.slot.arm(deadline)
        try:
            body = wire.BodyReader(self.rfile, limit).read(kind, length)
        except OSError:
            raise wire.HttpError(408, "the request body did not arrive in time") from None
        finally:
            self.slot.disarm()
        self.body_pending = False
        return body

    # -- writing -----------------------------------------------------------------

    def cors_headers(self):
        origin = exposure.allowed_origin(self.server.settings, self.headers)
        return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")] if origin else []

    def send_bytes(self, status, body, content_type="application/json", headers=None):
        if self.body_pending or self.server.draining:
            self.close_connection = True
        lines = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        lines += list((headers or {}).items()) + self.cors_headers()
        if self.close_connection:
            lines.append(("Connection", "close"))
        reason = self.responses.get(status, ("",))[0]
        head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in lines) + "\r\n"
        self.responded = True
        self.wfile.write(head.encode("latin-1") + body)
        self.log_request(status)

    def send_json(self, status, obj, headers=None):
        self.send_bytes(status, json.dumps(obj).encode(), headers=headers)

    def answer_error(self, err):
        if err.status == 400:
            self.close_connection = True    # a client that framed one request wrong may frame the next wrong
        if self.forward_path is not None:
            self.server.store.add(self.rejected_record(err.status))
        else:
            self.server.store.log_rejected({
                "timestamp": getattr(self, "started_ms", int(self.server.clock() * 1000)),
                "path": (self.path or "")[:200].split("?")[0], "status": err.status,
                "outcome": "rejected", "reason": err.kind})
        self.send_bytes(err.status, wire.error_body(err.kind, err.message), headers=err.headers)

    def rejected_record(self, status):
        return {"timestamp": self.started_ms, "account": None, "path": self.forward_path,
                "model": None, "status": status, "stream": False,
                "api": "openai" if self.forward_path == "/v1/chat/completions" else "anthropic",
                "inputTokens": 0, "outputTokens": 0, "cacheReadTokens": 0, "cacheCreateTokens": 0,
                "ttfbMs": None, "latencyMs": round((time.monotonic() - self.started) * 1000, 2),
                "claim": "unknown", "bucket": "unknown", "unifiedStatus": None, "util5h": None,
                "util7d": None, "overageUtil": None, "overageStatus": None, "overageInUse": None,
                "requestId": None, "outcome": "rejected", "sessionId": None}

    def send_error(self, code, message=None, explain=None):
        """Used by the stdlib parser for malformed requests: answer JSON and close."""
        self.close_connection = True
        self.body_pending = True
        kind = wire.ERROR_KINDS.get(code, "invalid_request_error")
        try:
            self.send_bytes(code, wire.error_body(kind, message or self.responses.get(code, ("error",))[0]))
        except OSError:
            pass

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code="-", size="-"):
        log.debug("%s %s -> %s", self.command, (self.path or "")[:200], code)

    # -- the gateway's own endpoints ---------------------------------------------

    def preflight(self):
        origin = exposure.allowed_origin(self.server.settings, self.headers)
        if origin is None:
            raise wire.HttpError(403, "preflight refused: origin not allowed")
        requested = self.headers.get("Access-Control-Request-Headers", "")
        headers = {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                   "Access-Control-Max-Age": "600"}
        if requested and "\r" not in requested and "\n" not in requested:
            headers["Access-Control-Allow-Headers"] = requested[:1000]
        self.send_bytes(204, b"", headers=headers)

    def do_health(self):
        server = self.server
        self.send_json(200, {
            "status": "ok",
            "guard": "halted" if server.guard.snapshot() else "normal",
            "version": __version__,
            "uptimeS": round(time.monotonic() - server.started_at, 1),
            "requests": server.store.summary()["requests"],
        })

    def do_status(self):
        self.send_json(200, self.server.status())

    def do_analytics(self):
        self.send_json(200, analytics.report(self.server.store, self.server.clock))

    def do_metrics(self):
        self.send_bytes(200, metrics.render(self.server).encode(), "text/plain; version=0.0.4; charset=utf-8")

    def do_resume_state(self):
        guard = self.server.guard
        halts = guard.halts()
        self.send_json(200, {"halted": bool(halts), "state": halts[0].public() if halts else None,
                             "halts": [halt.public() for halt in halts], "config": guard.config.public()})

    def do_resume(self):
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise wire.HttpError(415, "POST /admin/resume needs Content-Type: application/json")
        body = self.read_body(wire.body_framing(self.headers, ADMIN_BODY_LIMIT), ADMIN_BODY_LIMIT)
        try:
            request = json.loads(body) if body.strip() else {}
        except (ValueError, RecursionError):    # a hostile body can nest deeper than the parser
            raise wire.HttpError(400, "POST /admin/resume takes a JSON object, e.g. {} or "
                                      '{"account": "LABEL"}') from None
        account = request.get("account") if isinstance(request, dict) else None
        if account is not None and not isinstance(account, str):
            raise wire.HttpError(400, '"account" must be an account label')
        was_halted, resumed_at = self.server.guard.clear("manual", ALL if account is None else account)
        self.send_json(200, {"ok": True, "wasHalted": was_halted, "resumedAt": iso(resumed_at)})

    def do_analytics_stream(self):
        server = self.server
        try:
            sub, backlog = server.store.subscribe_with_backlog(server.bus, 50)
        except TooManySubscribers:
            raise wire.HttpError(503, "too many /analytics/stream subscribers; try again later") from None
        # A subscriber that hangs up frees its slot at once, not at the next heartbeat.
        self.slot.watch(sub.close)
        try:
            self.close_connection = True
            self.connection.settimeout(SSE_WRITE_TIMEOUT_S)
            # A small send buffer makes a subscriber that stopped reading show up as a
            # full queue soon, instead of after megabytes of kernel buffering.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SSE_SEND_BUFFER)
            head = ("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                    "Transfer-Encoding: chunked\r\nConnection: close\r\n"
                    + "".join(f"{n}: {v}\r\n" for n, v in self.cors_headers()) + "\r\n")
            frames = [sse_frame("record", record) for record in backlog]
            frames += [sse_frame("overage_halt", halt.public()) for halt in server.guard.halts()]
            self.responded = True
            self.wfile.write(head.encode("latin-1") + (wire.chunk(b"".join(frames)) if frames else b""))
            while True:
                item = sub.get(server.heartbeat_s)
                if item is None:
                    break
                frame = b": heartbeat\n\n" if item is Subscription.TIMEOUT else sse_frame(*item)
                self.wfile.write(wire.chunk(frame))
            self.wfile.write(wire.LAST_CHUNK)
        except OSError:
            log.debug("an /analytics/stream subscriber went away")
        finally:
            self.slot.unwatch()
            sub.close()


def sse_frame(name, data):
    payload = json.dumps(data, separators=(",", ":")).encode()
    if name == "record":
        return b"data: " + payload + b"\n\n"      # records are the stream's default events
    return b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"

