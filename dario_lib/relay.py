"""Forwarding one request upstream and relaying the answer, as it arrives, to the client.

The order of events for a forwarded route is the heart of the gateway:

1. the guard check, right before the upstream send (guarded routes only), and the
   budget reservation of the request's worst-case cost;
2. the upstream send, outside any lock, written at most once, with the client's
   connection watched: a client that hangs up stops the exchange in any phase;
3. the billing signals, read the moment the response headers arrive, go to the guard
   before a single byte reaches the client;
4. the body, relayed read by read (`read1`, so chunked and close-delimited bodies alike
   pass each event on as it comes), while a `Meter` reads a copy;
5. one record, whatever happened (ok, upstream fault, client gone, halted), and the
   reservation settled with the metered cost. A billed answer whose usage could not be
   read is charged its worst case and marked `usageEstimated`: never counted as free.

An `Exchange` takes the request's facts (`Request`), the `reply.Reply` that owns the
response, and the gateway's shared parts (the server object: guard, budgets, upstream,
record store, settings). It never touches the handler.
Runs on the request's thread.
"""

import hashlib
import json
import logging
import math
import re
import time

from . import billing, budgets, guard as guard_mod, wire
from .metering import Meter
from .upstream import Cancel, ClientGone, UpstreamError, UpstreamReadError

log = logging.getLogger(__name__)

READ_SIZE = 65536
REDACT_CAP = 1024 * 1024        # an error body is buffered up to this to redact the upstream key
REDACTED = "[redacted]"
METERED_CODINGS = frozenset({"gzip", "x-gzip", "deflate", "identity"})
_MODEL_IN_HEAD = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
_STREAM_IN_HEAD = re.compile(rb'"stream"\s*:\s*true')
_SESSION_HEADER = "x-claude-code-session-id"
_UPSTREAM_READ_ERRORS = (UpstreamReadError, OSError)


class Request:
    """What the relay needs to know about a client's request (read-only by convention)."""

    __slots__ = ("method", "version", "path", "query", "headers", "hop_tokens", "started", "started_ms",
                 "watch")

    def __init__(self, method, version, path, query, headers, hop_tokens, started, started_ms, watch):
        self.method = method
        self.version = version
        self.path = path
        self.query = query
        self.headers = headers          # headers.Headers, as the client sent them
        self.hop_tokens = hop_tokens    # header names the client's Connection header lists
        self.started = started          # time.monotonic() when the request head was read
        self.started_ms = started_ms    # epoch ms, for the record
        self.watch = watch              # watchdog.Slot of the client connection (hang-up watch)


def _text(value, limit=200):
    """Request text kept in a record: bounded, and no lone surrogates (they break encoders)."""
    if not isinstance(value, str) or not value:
        return None
    value = value[:limit]
    return value if value.isascii() else value.encode("utf-8", "replace").decode("utf-8")


def request_facts(body):
    """(model, max_tokens, stream) a request asks for, read cheaply (whole JSON only for
    small bodies). Raises budgets.BadRequest for an absurd max_tokens."""
    if not body:
        return None, 0, False
    if len(body) <= 262144:
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):   # a hostile body can nest deeper than the parser
            obj = None
        if not isinstance(obj, dict):
            obj = None
        model = _text(obj.get("model")) if obj else None
        stream = bool(obj) and obj.get("stream") is True
        return model, budgets.max_tokens_of(body, obj), stream
    found = _MODEL_IN_HEAD.search(body, 0, 65536)
    model = _text(found.group(1).decode("utf-8", "replace")) if found else None
    return model, budgets.max_tokens_of(body), bool(_STREAM_IN_HEAD.search(body, 0, 65536))


def account_label(aliases, credential):
    """A record's `account`: configured alias, else key:<8 hex of sha256>, else anonymous."""
    if not credential:
        return "anonymous"
    digest = hashlib.sha256(credential.encode("latin-1", "replace")).hexdigest()
    return aliases.get(digest) or "key:" + digest[:8]


def narrow_encodings(value):
    """The client's Accept-Encoding narrowed to the codings dario can meter.

    dario must read every answer's usage; an answer in a coding it cannot decode (br,
    zstd) would go unmetered. A client that also accepts gzip, deflate or identity gets
    one of those; with none left, identity. No header stays no header (an answer in a
    coding dario cannot read is still charged its worst case).
    """
    if value is None:
        return None
    kept = []
    for item in (value or "").split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip(" \t").lower()
        if coding == "*":
            kept.append("gzip, deflate")
        elif coding in METERED_CODINGS and not re.fullmatch(r"\s*q\s*=\s*0(\.0*)?\s*", params):
            kept.append(item.strip(" \t"))
    return ", ".join(kept) or "identity"


def upstream_headers(settings, headers, hop_tokens):
    """(headers for upstream, the credential they carry) from the client's request headers.

    The credential is read from what is actually forwarded (after hop-by-hop stripping
    and DARIO_UPSTREAM_API_KEY substitution), so the account label, the halt and the
    budget follow the credential the upstream will bill.
    """
    drop = {"host", "content-length", "x-dario-api-key", "accept-encoding"}
    if settings.upstream_api_key:
        drop |= {"x-api-key", "authorization"}
    out, lowered = {}, {}
    for name, value in wire.relayable(headers.items(), hop_tokens, drop):
        key = name.lower()
        if key in lowered:
            out[lowered[key]] += ", " + value
        else:
            lowered[key] = name
            out[name] = value
    accepted = headers.get_all("Accept-Encoding")
    if accepted and "accept-encoding" not in hop_tokens:
        out["Accept-Encoding"] = narrow_encodings(", ".join(accepted))
    if settings.upstream_api_key:
        out["x-api-key"] = settings.upstream_api_key
        return out, settings.upstream_api_key
    api_key = out.get(lowered.get("x-api-key"))
    authorization = out.get(lowered.get("authorization"))
    return out, api_key or wire.bearer(authorization)


_RECORD = {
    "timestamp": None, "account": None, "path": None, "model": None, "status": None, "stream": False,
    "api": "anthropic",
    "inputTokens": 0, "outputTokens": 0, "cacheReadTokens": 0, "cacheCreateTokens": 0,
    "ttfbMs": None, "latencyMs": None,
    "claim": "unknown", "bucket": billing.UNKNOWN,
    "unifiedStatus": None, "util5h": None, "util7d": None, "overageUtil": None,
    "overageStatus": None, "overageInUse": None, "overageReset": None, "overageDisabledReason": None,
    "fallback": None, "windows": {},
    "requestId": None, "outcome": "ok", "sessionId": None,
}


def new_record(path, started_ms, account=None, session_id=None):
    """A record's every field (SPEC section 5), at its value before anything is known."""
    record = _RECORD.copy()
    record["timestamp"], record["account"], record["path"], record["sessionId"] = \
        started_ms, account, path, session_id
    record["windows"] = {}
    if path == "/v1/chat/completions":
        record["api"] = "openai"
    return record


def rejected_record(path, status, started_ms, started):
    """The record of a request to a forwarded route refused before it became an exchange."""
    record = new_record(path, started_ms)
    record.update(status=status, outcome="rejected", latencyMs=round((time.monotonic() - started) * 1000, 2))
    return record


class Exchange:
    """One forwarded request's state, from the guard check to the record."""

    def __init__(self, server, request, reply):
        self.server = server
        self.req = request
        self.reply = reply
        self.body = b""
        self.budgets = server.budgets           # the one this request reserves on, even across a reload
        self.ticket = None                      # its budget reservation (budgets.Ticket), once granted
        self.worst = 0.0                        # a guarded request's worst-case cost
        self.sent = False                       # some of it may have reached the upstream
        self.guarded = request.path in guard_mod.BLOCKED_PATHS
        self.headers, credential = upstream_headers(server.settings, request.headers, request.hop_tokens)
        self.record = new_record(request.path, request.started_ms,
                                 account_label(server.account_aliases, credential),
                                 _text(request.headers.get(_SESSION_HEADER), 128))

    # -- before the body (Expect: 100-continue) ------------------------------------

    def admit(self):
        """Before the body is read: False (after answering 503) when a halt blocks it.

        A client that asked for `100 Continue` is never invited to upload a body that
        would certainly be refused.
        """
        if not self.guarded:
            return True
        verdict = self.server.guard.admit(self.record["account"])
        if verdict.response is None:
            return True
        self._refuse(verdict.response)
        return False

    def refused(self, status):
        """The gateway refused this request itself (a wire.HttpError): record it."""
        self.finish(status, "rejected")

    # -- the exchange ------------------------------------------------------------

    def run(self):
        try:
            self._run()
        finally:
            if self.ticket is not None:         # never finished: release what it held
                ticket, self.ticket = self.ticket, None
                ticket.settle(self.record["account"], self.worst if self.sent else 0.0, self.request_info(),
                              extra=self.sent and self._extra_usage(ticket))

    def _run(self):
        record = self.record
        try:
            model, max_tokens, stream = request_facts(self.body)
        except budgets.BadRequest as err:
            raise wire.HttpError(400, str(err)) from None
        record["model"], record["stream"] = model, stream
        if self.guarded:
            # The halt check and the budget reservation, right before the send (one round
            # trip to a team's Redis store).
            self.worst = budgets.worst_case_usd(model, len(self.body), max_tokens)
            verdict = self.server.guard.admit(record["account"], self.budgets, self.worst)
            if verdict.response is not None:
                self._refuse(verdict.response)
                return
            self.ticket = verdict.ticket
        cancel = Cancel()
        watch = self.req.watch
        watch.watch(cancel.fire)                # a client that hangs up stops the exchange
        try:
            self.sent = True
            try:
                resp = self.server.upstream.send(self.req.method, self._target(), self.headers, self.body,
                                                 cancel)
            except ClientGone as gone:
                self.sent = gone.sent
                self.reply.close = True
                self.finish(None, "client_gone", estimated=self.sent)
                return
            except UpstreamError as err:
                self.sent = err.sent
                self.finish(err.status, "upstream_error", estimated=self.sent)
                self.reply.error(err.status, err.kind, err.reason)
                return
            record["ttfbMs"] = round((time.monotonic() - self.req.started) * 1000, 2)
            self.relay(resp, cancel)
        finally:
            watch.unwatch()

    def _target(self):
        return self.req.path + ("?" + self.req.query if self.req.query else "")

    def _refuse(self, response):
        """Answer the guard's 503 (a halt, a budget hold-back, the team store unavailable)."""
        extra, body = response
        self.finish(503, "halted")              # recorded before the client can see it
        self.reply.json(503, body, extra.items())

    def _observe(self, resp):
        rate = billing.parse_ratelimit(resp.headers, self.server.settings.guard.subscription_claims)
        self.record.update(rate)
        self.record["requestId"] = _text(resp.headers.get("request-id"), 128)
        self.server.guard.observe(rate, self.request_info())

    def relay(self, resp, cancel):
        self._observe(resp)
        meter = Meter(resp.headers.get("content-type", ""), resp.headers.get("content-encoding", ""))
        headers = self._response_headers(resp)
        status = resp.status
        if self.server.settings.upstream_api_key and status >= 300 and resp.framing != "none":
            self._relay_redacted(resp, meter, headers)
            return
        reply = self.reply
        length = resp.length if resp.framing == "length" else None
        reason = "".join(ch for ch in (resp.reason or "") if ch.isprintable())[:64]
        outcome, died = "ok", None
        try:
            if resp.framing == "none" or length == 0:
                reply.start(status, headers, length, reason)
            else:
                # A body of known length: the head waits for its first bytes (one write for
                # both), so if the upstream dies before any, the client still gets a clean
                # 502. Other bodies (streams) get their head at once, as the upstream sent it.
                first = length is not None
                if not first:
                    reply.start(status, headers, length, reason)
                while True:
                    try:
                        data = resp.read1(READ_SIZE)
                    except _UPSTREAM_READ_ERRORS as err:
                        died = err
                        break
                    if not data:
                        break
                    meter.feed(data)
                    if first:
                        reply.start(status, headers, length, reason, body=data)
                        first = False
                    else:
                        reply.write(data)
                if died is None:
                    if first:
                        reply.start(status, headers, length, reason)
                    reply.end()
                elif not cancel.fired:
                    outcome = "upstream_error"
                    if first:                   # nothing sent yet: a clean 502 instead
                        status = 502
                        self.reply.error(502, "api_error", "upstream connection lost before the body")
                    else:
                        self._end_after_upstream_death(meter, died)
        except OSError:
            outcome = "client_gone"
        if cancel.fired:
            outcome = "client_gone"
        self._settle_connection(resp, outcome == "ok" and died is None)
        self._finish_metered(status, outcome, meter)

    def _relay_redacted(self, resp, meter, headers):
        """An error answer while DARIO_UPSTREAM_API_KEY is set: read it whole (bounded) and
        replace any echo of the key, so a client holding only the dario key never learns it."""
        parts, size, died = [], 0, False
        while size <= REDACT_CAP:
            try:
                data = resp.read1(READ_SIZE)
            except _UPSTREAM_READ_ERRORS:
                died = True
                break
            if not data:
                break
            parts.append(data)
            size += len(data)
        complete = not died and size <= REDACT_CAP
        self._settle_connection(resp, complete)
        body = b"".join(parts)
        meter.feed(body)
        if not complete:
            self.reply.error(502, "api_error", "the upstream's error answer could not be relayed whole")
            self._finish_metered(502, "upstream_error", meter)
            return
        key = self.server.settings.upstream_api_key.encode("latin-1", "replace")
        body = body.replace(key, REDACTED.encode())
        content_type = resp.headers.get("content-type", "application/octet-stream")
        headers = [(n, v) for n, v in headers if n.lower() != "content-type"]
        self.reply.send(resp.status, body, content_type, headers)
        self._finish_metered(resp.status, "ok", meter)

    def _settle_connection(self, resp, complete):
        if complete:
            resp.release_conn()         # body fully read: the connection goes back to the pool
        else:
            resp.close()
            self.reply.close = True

    def _finish_metered(self, status, outcome, meter):
        meter.close()
        record = self.record
        record["stream"] = meter.is_stream or record["stream"]
        if meter.model:
            record["model"] = _text(meter.model)
        record.update(meter.usage)
        if outcome == "ok" and (status >= 500 or meter.error_type):
            outcome = "upstream_error"
        if outcome == "client_gone":
            log.debug("client hung up during %s; upstream exchange closed", self.req.path)
        # A billed answer without its final usage report is charged its worst case, unless
        # it was cut short on purpose (the client left, or the upstream ended it with an
        # error event) after usage had been reported: then the reported usage counts.
        billed = self.guarded and 200 <= status < 300
        cut_short = outcome == "client_gone" or meter.error_type is not None
        estimated = billed and not meter.final and not (cut_short and meter.reported)
        self.finish(status, outcome, estimated)

    def _response_headers(self, resp):
        """The upstream's headers as relayed: framing headers are the reply's to write."""
        named = wire.connection_tokens(resp.headers)
        lines = list(wire.relayable(resp.headers.items(), named, {"content-length"}))
        key = self.server.settings.upstream_api_key
        if key:
            lines = [(n, v.replace(key, REDACTED)) for n, v in lines]
        return lines

    def _end_after_upstream_death(self, meter, err):
        """Tell a stream's client the upstream died; other bodies can only be cut short."""
        self.reply.close = True
        log.info("upstream connection lost during %s (%s)", self.req.path, type(err).__name__)
        if not meter.is_stream or self.reply.framing == "length":
            return
        frame = (b"event: error\ndata: "
                 + wire.error_body("api_error", "upstream connection lost mid-stream") + b"\n\n")
        self.reply.end(frame)

    def request_info(self):
        record = self.record
        return {"timestamp": record["timestamp"], "model": record["model"], "account": record["account"],
                "claim": record["claim"], "path": self.req.path, "requestId": record["requestId"]}

    def finish(self, status, outcome, estimated=False):
        record = self.record
        record["status"] = status
        record["outcome"] = outcome
        record["latencyMs"] = round((time.monotonic() - self.req.started) * 1000, 2)
        if estimated:
            record["usageEstimated"] = True
            record["costUsd"] = math.ceil(self.worst * 1e6) / 1e6    # rounded up, never down
        extra = self.ticket is not None and self._extra_usage(self.ticket)
        record = self.server.store.add(record)
        if self.ticket is not None:
            ticket, self.ticket = self.ticket, None
            ticket.settle(record["account"], record["costUsd"], self.request_info(), extra=extra)

    def _extra_usage(self, ticket):
        """Does this request's cost count against the extra-usage cap? When its answer was
        served from extra usage; or, when no answer head was seen (the client left, the
        upstream failed), when it was sent while its account was in extra usage."""
        if "billingSignal" in self.record:          # the answer's head was read (_observe)
            return guard_mod.served_from_extra_usage(self.record)
        return ticket.capped
