"""The request handler: checks, the route table, and the gateway's own endpoints.

Every request goes through the same gate, in this order: request-target form, Host
(DNS rebinding), browser origin, API key; then the route table. The gateway's own
endpoints (`/health`, `/status`, `/analytics`, `/analytics/stream`, `/admin/resume`,
`/admin/config`, whose logic lives in `admin_config`) are answered here; the forwarded
API routes go to `relay.Exchange`.

Every response goes out through the request's `reply.Reply`, which owns the head, the
framing and whether the connection closes (answering before a request's whole body was
read closes it, so unread body bytes can never be parsed as a next request). Anything
the gateway answers itself is an Anthropic-shaped JSON error, decided before the first
byte is written. Client disconnects are debug lines, never tracebacks.

Request heads and bodies are charged against the gateway-wide allowances
(`server.heads`, `server.bodies`) while they are held; past either, a new request gets a
503 `overloaded_error` with `Retry-After`.

One instance per connection, on that connection's thread (ThreadingHTTPServer).
"""

import json
import logging
import re
import socket
import time
from http.server import BaseHTTPRequestHandler

from . import __version__, admin_config, analytics, exposure, headers, metrics, relay, wire
from .events import Subscription, TooManySubscribers
from .guard import ALL, iso
from .reply import Reply

log = logging.getLogger(__name__)

HEAD_DEADLINE_S = 75          # idle keep-alive wait plus request line and headers
BODY_DEADLINE_S = 60          # plus one second per 256 KiB declared
SOCKET_TIMEOUT_S = 60         # any single read or write on the client socket
SSE_WRITE_TIMEOUT_S = 10
SSE_SEND_BUFFER = 65536
ADMIN_BODY_LIMIT = 65536
HEAD_CHARGE_STEP = 8192           # request head bytes taken from the gateway-wide allowance at once

FORWARDED = {
    "/v1/messages": "POST",
    "/v1/messages/count_tokens": "POST",
    "/v1/complete": "POST",
    "/v1/chat/completions": "POST",
    "/v1/models": "GET",
}
_MODEL_PATH = re.compile(r"/v1/models/[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
LOCAL = {
    ("GET", "/"): "root",
    ("HEAD", "/"): "root",
    ("GET", "/health"): "health",
    ("GET", "/status"): "status",
    ("GET", "/analytics"): "analytics",
    ("GET", "/analytics/stream"): "analytics_stream",
    ("GET", "/admin/resume"): "resume_state",
    ("POST", "/admin/resume"): "resume",
    ("GET", "/admin/config"): "config_state",
    ("PUT", "/admin/config"): "config_update",
    ("GET", "/metrics"): "metrics",
}
LOCAL_PATHS = {path for _, path in LOCAL}
_OVERLOADED_HEADERS = {"Retry-After": "1"}


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
        self.path = ""                  # log_request() runs even when the request line is refused
        self.command, self.request_version = "", "HTTP/1.1"
        self.held_head = self.held_body = 0
        self.slot.arm(HEAD_DEADLINE_S)
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if self.raw_requestline in (b"\r\n", b"\n"):   # RFC 9112: tolerate one empty line
                self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline or self.raw_requestline in (b"\r\n", b"\n"):
                self.close_connection = True
                return
            if len(self.raw_requestline) > 65536:
                raise headers.HeadError(414, "request line too long")
            self.parse_request()
        except headers.HeadError as err:
            self._refuse_head(err)
            self._release()
            return
        except OSError as err:
            log.debug("connection dropped before a request arrived: %s", err)
            self.close_connection = True
            self._release()
            return
        finally:
            self.slot.disarm()
        self.started = time.monotonic()
        self.started_ms = int(self.server.clock() * 1000)
        try:
            self.dispatch()
        except OSError as err:
            log.debug("client connection lost during %s %s: %s", self.command, self.path, err)
            self.reply.close = True
        except Exception:
            log.exception("internal error while serving %s %s", self.command, self.path)
            self.reply.close = True
            if not self.reply.sent:
                try:
                    self.reply.error(500, "api_error", "internal error in dario; see its log")
                except OSError:
                    pass
        finally:
            self._release()
        self.close_connection = self.reply.close

    def _draining(self):
        return self.server.draining

    def _charge_head(self, n):
        if not self.server.heads.take(n):
            raise headers.HeadError(503, "dario is holding too many request heads; retry shortly")
        self.held_head += n

    def _charge_body(self, n):
        if not self.server.bodies.take(n):
            raise wire.HttpError(503, "dario is holding too many request bodies; retry shortly",
                                 headers=_OVERLOADED_HEADERS)
        self.held_body += n

    def _release(self):
        """Give back what this request held of the gateway-wide allowances."""
        if self.held_head:
            self.server.heads.give(self.held_head)
        if self.held_body:
            self.server.bodies.give(self.held_body)
        self.held_head = self.held_body = 0

    def parse_request(self):
        """Parse the request line and headers (see `headers`); raises HeadError."""
        self.headers = headers.Headers()
        self.requestline = self.raw_requestline.rstrip(b"\r\n").decode("latin-1")
        self.command, self.path, self.request_version = headers.parse_request_line(self.raw_requestline)
        # The request line and the head are charged together, in steps (one lock round
        # for a usual head).
        self.headers = headers.read_headers(self.rfile, self._charge_head, HEAD_CHARGE_STEP,
                                            len(self.raw_requestline))
        self.hop_tokens = tokens = wire.connection_tokens(self.headers)
        close = "close" in tokens or (self.request_version == "HTTP/1.0" and "keep-alive" not in tokens)
        if self.request_version == "HTTP/1.0" and "Transfer-Encoding" in self.headers:
            close = True                # RFC 9112 6.1: a 1.0 message with chunked framing closes
        self.reply = Reply(self.wfile, self.command, self.request_version, close,
                           extra=self._cors(), draining=self._draining)
        # Asked-for `100 Continue` goes out only once the request passed every check and its
        # body is about to be read (read_body), so a refused client never uploads for nothing.
        self.expect_continue = ((self.headers.get("Expect") or "").lower() == "100-continue"
                                and self.request_version == "HTTP/1.1")

    def _refuse_head(self, err):
        """A request line or head dario will not parse further: answer and close."""
        self.close_connection = True
        reply = Reply(self.wfile, self.command or "GET", close=True)
        extra = _OVERLOADED_HEADERS.items() if err.status == 503 else ()
        try:
            reply.error(err.status, wire.ERROR_KINDS.get(err.status, "invalid_request_error"),
                        err.message, extra)
        except OSError:
            pass
        self.log_request(err.status)

    def dispatch(self):
        method, target = self.command, self.path
        path, _, query = target.partition("?")
        # A request to a forwarded route is recorded even when refused (see answer_error).
        self.forward_path = path if target.startswith("/") and forwarded_method(path) else None
        settings = self.server.settings
        reply = self.reply
        reply.body_pending = True        # until the framing says there is no body
        exchange = None
        try:
            framing = wire.body_framing(self.headers, settings.max_body_bytes)
            reply.body_pending = framing[0] != "none"
            if not target.startswith("/"):
                raise wire.HttpError(400, "the request target must be a path starting with /")
            exposure.check_host(settings, self.headers)
            public = method in ("GET", "HEAD") and path in ("/health", "/")
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
            exchange = relay.Exchange(self.server, self._facts(path, query), reply)
            if self.expect_continue and framing[0] != "none" and not exchange.admit():
                return                  # halted: answered 503 before inviting the body
            exchange.body = self.read_body(framing)
            with self.server.tracker:
                exchange.run()
        except wire.HttpError as err:
            self.answer_error(err, exchange)

    def _facts(self, path, query):
        return relay.Request(method=self.command, version=self.request_version, path=path, query=query,
                             headers=self.headers, hop_tokens=self.hop_tokens, started=self.started,
                             started_ms=self.started_ms, watch=self.slot)

    # -- reading -----------------------------------------------------------------

    def read_body(self, framing, limit=None):
        kind, length = framing
        limit = limit or self.server.settings.max_body_bytes
        if kind == "length" and length > limit:
            raise wire.HttpError(413, f"request body over the {limit}-byte limit")
        if kind == "length" and length:
            self._charge_body(length)
        deadline = BODY_DEADLINE_S + (length if kind == "length" else limit) / 262144
        if self.expect_continue and kind != "none":
            self.reply.continue_()
            self.expect_continue = False
        self.slot.arm(deadline)
        try:
            body = wire.BodyReader(self.rfile, limit, self._charge_body if kind == "chunked" else None
                                   ).read(kind, length)
        except OSError:
            raise wire.HttpError(408, "the request body did not arrive in time") from None
        finally:
            self.slot.disarm()
        self.reply.body_pending = False
        return body

    # -- writing -----------------------------------------------------------------

    def _cors(self):
        origin = exposure.allowed_origin(self.server.settings, self.headers)
        return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")] if origin else []

    def answer_error(self, err, exchange=None):
        if err.status == 400:
            self.reply.close = True     # a client that framed one request wrong may frame the next wrong
        if exchange is not None:
            exchange.refused(err.status)
        elif self.forward_path is not None:
            self.server.store.add(relay.rejected_record(self.forward_path, err.status, self.started_ms,
                                                        self.started))
        else:
            self.server.store.log_rejected({
                "timestamp": getattr(self, "started_ms", int(self.server.clock() * 1000)),
                "path": (self.path or "")[:200].split("?")[0], "status": err.status,
                "outcome": "rejected", "reason": err.kind})
        if self.reply.sent:
            self.reply.close = True
            return
        self.reply.http_error(err)
        self.log_request(err.status)

    def send_error(self, code, message=None, explain=None):
        """The stdlib calls this for requests it cannot parse: answer JSON and close."""
        self._refuse_head(headers.HeadError(code, message or self.responses.get(code, ("error",))[0]))

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
        headers = [("Access-Control-Allow-Methods", "GET, POST, PUT, OPTIONS"), ("Access-Control-Max-Age", "600")]
        if requested and "\r" not in requested and "\n" not in requested:
            headers.append(("Access-Control-Allow-Headers", requested[:1000]))
        self.reply.send(204, headers=headers)

    def do_root(self):
        port = self.server.port
        text = (f"dario {__version__}: a local gateway for the Anthropic API, with an overage guard.\n"
                f"Point clients at http://127.0.0.1:{port} (ANTHROPIC_BASE_URL for Claude Code).\n"
                "Health: GET /health. Status: GET /status. Docs: `man dario`, `dario --help`.\n")
        self.reply.send(200, text.encode(), "text/plain; charset=utf-8")

    def do_health(self):
        server = self.server
        self.reply.json(200, {
            "status": "ok",
            "guard": "halted" if server.guard.snapshot() else "normal",
            "version": __version__,
            "uptimeS": round(time.monotonic() - server.started_at, 1),
            "requests": server.store.summary()["requests"],
        })

    def do_status(self):
        self.reply.json(200, self.server.status())

    def do_analytics(self):
        server = self.server
        self.reply.json(200, analytics.report(server.store, server.clock,
                                              extra_usage=server.guard.extra_usage_status(server.budgets)))

    def do_metrics(self):
        self.reply.send(200, metrics.render(self.server).encode("utf-8", "replace"),
                        "text/plain; version=0.0.4; charset=utf-8")

    def do_resume_state(self):
        guard = self.server.guard
        halts = guard.halts()
        self.reply.json(200, {"halted": bool(halts), "state": halts[0].public() if halts else None,
                              "halts": [halt.public() for halt in halts], "config": guard.config.public()})

    def _admin_body(self, what, usage):
        """The JSON body of an admin request: Content-Type, size and parse checked."""
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise wire.HttpError(415, f"{what} needs Content-Type: application/json")
        body = self.read_body(wire.body_framing(self.headers, ADMIN_BODY_LIMIT), ADMIN_BODY_LIMIT)
        try:
            return json.loads(body) if body.strip() else {}
        except (ValueError, RecursionError):    # a hostile body can nest deeper than the parser
            raise wire.HttpError(400, f"{what} takes {usage}") from None

    def do_resume(self):
        request = self._admin_body("POST /admin/resume", 'a JSON object, e.g. {} or {"account": "LABEL"}')
        account = request.get("account") if isinstance(request, dict) else None
        if account is not None and not isinstance(account, str):
            raise wire.HttpError(400, '"account" must be an account label')
        was_halted, resumed_at = self.server.guard.clear("manual", ALL if account is None else account)
        self.reply.json(200, {"ok": True, "wasHalted": was_halted, "resumedAt": iso(resumed_at)})

    def do_config_state(self):
        self.reply.json(200, admin_config.state(self.server))

    def do_config_update(self):
        request = self._admin_body("PUT /admin/config",
                                   'a JSON object, e.g. {"set": {"overageGuard.behavior": "warn"}}')
        self.reply.json(200, admin_config.update(self.server, admin_config.parse_request(request)))

    def do_analytics_stream(self):
        server = self.server
        try:
            sub, backlog = server.store.subscribe_with_backlog(server.bus, 50)
        except TooManySubscribers:
            raise wire.HttpError(503, "too many /analytics/stream subscribers; try again later",
                                 headers={"Retry-After": "5"}) from None
        # A subscriber that hangs up frees its slot at once, not at the next heartbeat.
        self.slot.watch(sub.close)
        reply = self.reply
        try:
            reply.close = True
            self.connection.settimeout(SSE_WRITE_TIMEOUT_S)
            # A small send buffer makes a subscriber that stopped reading show up as a
            # full queue soon, instead of after megabytes of kernel buffering.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SSE_SEND_BUFFER)
            frames = [sse_frame("record", record) for record in backlog]
            frames += [sse_frame("overage_halt", halt.public()) for halt in server.guard.halts()]
            reply.start(200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
            reply.write(b"".join(frames))
            while True:
                item = sub.get(server.heartbeat_s)
                if item is None:
                    break
                reply.write(b": heartbeat\n\n" if item is Subscription.TIMEOUT else sse_frame(*item))
            reply.end()
        except OSError:
            log.debug("an /analytics/stream subscriber went away")
        finally:
            self.slot.unwatch()
            sub.close()


def sse_frame(name, data):
    payload = json.dumps(data, separators=(",", ":")).encode()
    if name == "record":
        return b"data: " + payload + b"\n\n"      # records are the stream's default events
    return b"event: " + name.encode() + b"\n" + b"data: " + payload + b"\n\n"
