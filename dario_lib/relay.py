"""Forwarding one request upstream and relaying the answer, as it arrives, to the client.

The order of events for a forwarded route is the heart of the gateway:

1. the guard check, right before the upstream send (guarded routes only);
2. the upstream send, outside any lock;
3. the claim, read the moment the response headers arrive, goes to the guard before
   a single byte reaches the client;
4. the body, relayed read by read (`read1`, so chunked and close-delimited bodies alike
   pass each event on as it comes), each write flushed, while a `Meter` reads a copy;
5. one record, whatever happened (ok, upstream fault, client gone, halted).

Runs on the handler's thread; shared objects are reached through `handler.server`.
"""

import hashlib
import json
import logging
import re
import time

from . import billing, budgets, guard as guard_mod, wire
from .metering import Meter
from .upstream import UpstreamError, UpstreamReadError

log = logging.getLogger(__name__)

READ_SIZE = 65536
_MODEL_IN_HEAD = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
_SESSION_HEADER = "x-claude-code-session-id"
_UPSTREAM_READ_ERRORS = (UpstreamReadError, OSError)


def request_facts(body):
    """(model, max_tokens) a request asks for, read cheaply (whole JSON only for small bodies)."""
    if not body:
        return None, 0
    if len(body) <= 262144:
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):   # a hostile body can nest deeper than the parser
            obj = None
        model = obj.get("model") if isinstance(obj, dict) else None
        model = model[:200] if isinstance(model, str) and model else None
        return model, budgets.max_tokens_of(body, obj if isinstance(obj, dict) else None)
    found = _MODEL_IN_HEAD.search(body, 0, 65536)
    model = found.group(1).decode("utf-8", "replace") if found else None
    return model, budgets.max_tokens_of(body)


def account_label(aliases, credential):
    """A record's `account`: configured alias, else key:<8 hex of sha256>, else anonymous."""
    if not credential:
        return "anonymous"
    digest = hashlib.sha256(credential.encode("latin-1", "replace")).hexdigest()
    return aliases.get(digest) or "key:" + digest[:8]


def upstream_headers(handler):
    """(headers for upstream, credential used) from the client's request headers."""
    settings = handler.server.settings
    headers = handler.headers
    drop = {"host", "content-length", "x-dario-api-key"}
    if settings.upstream_api_key:
        drop |= {"x-api-key", "authorization"}
    out = {}
    for name, value in wire.relayable(headers.items(), handler.hop_tokens, drop):
        if name in out:
            out[name] += ", " + value
        else:
            out[name] = value
    if settings.upstream_api_key:
        out["x-api-key"] = settings.upstream_api_key
        return out, settings.upstream_api_key
    credential = headers.get("x-api-key") or wire.bearer(headers.get("Authorization"))
    return out, credential


def _printable(value, limit=128):
    if value is None:
        return None
    return "".join(ch for ch in value[:limit] if ch.isprintable()) or None


class Exchange:
    """One forwarded request's state, from the guard check to the record."""

    def __init__(self, handler, path, query, body):
        self.h = handler
        self.server = handler.server
        self.path = path
        self.path_and_query = path + ("?" + query if query else "")
        self.body = body
        self.started = handler.started
        self.reservation = None
        self.budgets = self.server.budgets       # the one this request reserves on, even across a reload
        model, self.max_tokens = request_facts(body)
        self.record = {
            "timestamp": handler.started_ms,
            "account": "anonymous",
            "path": path,
            "model": model,
            "status": None,
            "stream": False,
            "api": "openai" if path == "/v1/chat/completions" else "anthropic",
            "inputTokens": 0, "outputTokens": 0, "cacheReadTokens": 0, "cacheCreateTokens": 0,
            "ttfbMs": None, "latencyMs": None,
            "claim": "unknown", "bucket": billing.UNKNOWN,
            "unifiedStatus": None, "util5h": None, "util7d": None, "overageUtil": None,
            "overageStatus": None, "overageInUse": None,
            "requestId": None, "outcome": "ok",
            "sessionId": _printable(handler.headers.get(_SESSION_HEADER)),
        }

    # -- the exchange ------------------------------------------------------------

    def run(self):
        try:
            self._run()
        finally:
            if self.reservation is not None:        # never finished: release what it held
                self.budgets.settle(self.reservation, self.record["account"], 0.0, self.request_info())

    def _run(self):
        headers, credential = upstream_headers(self.h)
        self.record["account"] = account_label(self.server.account_aliases, credential)
        if self.path in guard_mod.BLOCKED_PATHS:
            halt = self.server.guard.check(self.record["account"])
            if halt is not None:
                extra, body = guard_mod.blocked_response(halt, int(self.server.clock() * 1000))
                self.finish(503, "halted")          # recorded before the client can see it
                self.h.send_json(503, body, extra)
                return
            if self.budgets.active:
                reservation = self.budgets.reserve(self.record["account"], self.record["model"],
                                                   len(self.body), self.max_tokens)
                if isinstance(reservation, budgets.Refusal):
                    extra, body = reservation.response()
                    self.finish(503, "halted")
                    self.h.send_json(503, body, extra)
                    return
                self.reservation = reservation
        try:
            resp = self.server.upstream.send(self.h.command, self.path_and_query, headers, self.body)
        except UpstreamError as err:
            self.finish(err.status, "upstream_error")
            self.h.send_bytes(err.status, wire.error_body(err.kind, err.reason))
            return
        self.record["ttfbMs"] = round((time.monotonic() - self.started) * 1000, 2)
        self.relay(resp)

    def _observe(self, resp):
        rate = billing.parse_ratelimit(resp.headers.get, self.server.settings.guard.subscription_claims)
        self.record.update(rate)
        self.record["requestId"] = _printable(resp.headers.get("request-id"))
        self.server.guard.observe(rate, self.request_info())

    def relay(self, resp):
        self._observe(resp)
        status = resp.status
        meter = Meter(resp.headers.get("content-type", ""), resp.headers.get("content-encoding", ""))
        self.record["stream"] = meter.is_stream
        framing, head = self._response_head(resp, status)
        out = self.h.wfile
        self.h.responded = True     # the head is going out: a later failure can only close
        gone = []               # set by the watchdog when the client hangs up
        self.h.slot.watch(lambda: (gone.append(True), resp.abort()))
        outcome, died = "ok", None
        try:
            if framing == "none":
                out.write(head)
            else:
                if framing != "length":
                    out.write(head)
                    head = None
                while True:
                    try:
                        data = resp.read1(READ_SIZE)
                    except _UPSTREAM_READ_ERRORS as err:
                        died = err
                        break
                    if not data:
                        break
                    meter.feed(data)
                    payload = wire.chunk(data) if framing == "chunked" else data
                    if head is not None:
                        payload, head = head + payload, None
                    out.write(payload)
                if died is None:
                    if head is not None:
                        out.write(head)     # an empty Content-Length body
                    elif framing == "chunked":
                        out.write(wire.LAST_CHUNK)
                elif not gone:
                    outcome = "upstream_error"
                    if head is not None:    # nothing sent yet: a clean 502 instead
                        status = 502
                        self.h.send_bytes(502, wire.error_body("api_error", "upstream connection lost before the body"))
                    else:
                        self._end_after_upstream_death(framing, meter, died)
        except OSError:
            outcome = "client_gone"
        finally:
            self.h.slot.unwatch()
        if gone:
            outcome = "client_gone"
        if outcome == "ok" and died is None:
            resp.release_conn()         # body fully read: the connection goes back to the pool
        else:
            resp.close()
            self.h.close_connection = True
        meter.close()
        self.record["stream"] = meter.is_stream
        if meter.model:
            self.record["model"] = meter.model
        self.record.update(meter.usage)
        if outcome == "ok" and (status >= 500 or meter.error_type):
            outcome = "upstream_error"
        if outcome == "client_gone":
            log.debug("client hung up during %s; upstream response closed", self.path)
        self.finish(status, outcome)

    def _response_head(self, resp, status):
        """(body framing towards the client, head bytes) for the upstream's response."""
        named = wire.connection_tokens(resp.headers)
        lines = list(wire.relayable(resp.headers.items(), named, {"content-length"}))
        length = resp.headers.get("content-length")
        if self.h.command == "HEAD" or status in (204, 304) or 100 <= status < 200:
            framing = "none"
        elif length is not None and length.strip().isdigit():
            framing = "length"
            lines.append(("Content-Length", length.strip()))
        elif self.h.request_version == "HTTP/1.1":
            framing = "chunked"
            lines.append(("Transfer-Encoding", "chunked"))
        else:
            framing = "close"
            self.h.close_connection = True
        if self.h.close_connection or self.server.draining:
            self.h.close_connection = True
            lines.append(("Connection", "close"))
        lines.extend(self.h.cors_headers())
        reason = "".join(ch for ch in (resp.reason or "") if ch.isprintable())[:64]
        head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in lines) + "\r\n"
        return framing, head.encode("latin-1", "replace")

    def _end_after_upstream_death(self, framing, meter, err):
        """Tell a stream's client the upstream died; other bodies can only be cut short."""
        self.h.close_connection = True
        log.info("upstream connection lost during %s (%s)", self.path, type(err).__name__)
        if not meter.is_stream or framing == "length":
            return
        frame = (b"event: error\ndata: "
                 + wire.error_body("api_error", "upstream connection lost mid-stream") + b"\n\n")
        self.h.wfile.write(wire.chunk(frame) + wire.LAST_CHUNK if framing == "chunked" else frame)

    def request_info(self):
        record = self.record
        return {"timestamp": record["timestamp"], "model": record["model"], "account": record["account"],
                "claim": record["claim"], "path": self.path, "requestId": record["requestId"]}

    def finish(self, status, outcome):
        self.record["status"] = status
        self.record["outcome"] = outcome
        self.record["latencyMs"] = round((time.monotonic() - self.started) * 1000, 2)
        record = self.server.store.add(self.record)
        if self.reservation is not None:
            reservation, self.reservation = self.reservation, None
            self.budgets.settle(reservation, record["account"], record["costUsd"], self.request_info())
