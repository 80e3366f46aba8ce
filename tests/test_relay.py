"""The relay without sockets: an Exchange between scripted upstream bytes and a Reply
writing into memory, with the real guard, budgets and record store.
"""

import io
import json
import time
import types


from dario_lib import budgets as budgets_mod
from dario_lib.events import EventBus
from dario_lib.guard import Guard
from dario_lib.headers import Headers
from dario_lib.records import RecordStore
from dario_lib.relay import Exchange, Request, narrow_encodings
from dario_lib.reply import Reply
from dario_lib.upstream import Response, Upstream

from .helpers import FakeClock, RecordingNotifier, TimerFactory, make_settings

MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]}


class ScriptedUpstream:
    """Answers `send` with a real upstream.Response reading the scripted bytes."""

    def __init__(self, raw):
        self.raw = raw
        self.sent = []
        self.pooled = []

    def send(self, method, target, headers, body, cancel):
        self.sent.append((method, target, dict(headers), body))
        rfile = io.BufferedReader(io.BytesIO(self.raw))
        status, reason, head = Upstream._read_head(rfile)
        conn = types.SimpleNamespace(rfile=rfile, sock=None, close=lambda: None)
        return Response(self, conn, status, reason, head, method, cancel)

    def _put(self, conn):
        self.pooled.append(conn)


class Slot:
    def watch(self, on_gone):
        self.on_gone = on_gone

    def unwatch(self):
        self.on_gone = None


def exchange(tmp_path, raw, version="HTTP/1.1", body=None, headers=()):
    clock = FakeClock()
    settings = make_settings(tmp_path)
    bus = EventBus()
    guard = Guard(settings.guard, bus=bus, notifier=RecordingNotifier(), clock=clock, timer_factory=TimerFactory())
    server = types.SimpleNamespace(
        settings=settings, clock=clock, guard=guard, store=RecordStore(100, bus),
        budgets=budgets_mod.Budgets((), None, guard, clock), upstream=ScriptedUpstream(raw),
        account_aliases={})
    request = Request(method="POST", version=version, path="/v1/messages", query="",
                      headers=Headers([("x-api-key", "k"), *headers]), hop_tokens=frozenset(),
                      started=time.monotonic(), started_ms=int(clock() * 1000), watch=Slot())
    out = io.BytesIO()
    reply = Reply(out, "POST", version)
    ex = Exchange(server, request, reply)
    ex.body = json.dumps(body or MESSAGE).encode()
    return ex, out, server


def answer(body, headers=b"", framing="length"):
    if framing == "chunked":
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                + headers + b"\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
            + headers + b"\r\n" + body)


USAGE = json.dumps({"type": "message", "model": "claude-sonnet-4-5",
                    "usage": {"input_tokens": 10, "output_tokens": 20}}).encode()
CLAIM = b"anthropic-ratelimit-unified-representative-claim: five_hour\r\n"


def test_a_length_framed_answer_is_relayed_with_its_length_and_metered(tmp_path):
    ex, out, server = exchange(tmp_path, answer(USAGE, CLAIM))
    ex.run()
    head, _, body = out.getvalue().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: %d" % len(USAGE) in head
    assert body == USAGE
    record = server.store.snapshot()[-1]
    assert (record["inputTokens"], record["outputTokens"], record["outcome"]) == (10, 20, "ok")
    assert not record.get("usageEstimated") and server.upstream.pooled      # connection reused


def test_transfer_encoding_wins_and_the_upstream_length_is_never_relayed(tmp_path):
    ex, out, _ = exchange(tmp_path, answer(USAGE, CLAIM + b"Content-Length: 3\r\n", "chunked"))
    ex.run()
    head, _, body = out.getvalue().partition(b"\r\n\r\n")
    assert b"Content-Length" not in head and b"Transfer-Encoding: chunked" in head
    assert body == b"%x\r\n%s\r\n0\r\n\r\n" % (len(USAGE), USAGE)


def test_an_http10_client_gets_a_close_delimited_body(tmp_path):
    ex, out, _ = exchange(tmp_path, answer(USAGE, CLAIM, "chunked"), version="HTTP/1.0")
    ex.run()
    head, _, body = out.getvalue().partition(b"\r\n\r\n")
    assert b"Connection: close" in head and b"Transfer-Encoding" not in head and body == USAGE
    assert ex.reply.close


def test_a_billed_answer_without_usage_is_charged_its_worst_case(tmp_path):
    ex, out, server = exchange(tmp_path, answer(b'{"type": "message"}', CLAIM))
    ex.run()
    record = server.store.snapshot()[-1]
    worst = budgets_mod.worst_case_usd("claude-sonnet-4-5", len(ex.body), 1000)
    assert record["usageEstimated"] is True and worst <= record["costUsd"] < worst + 1e-6


def test_the_guard_sees_the_claim_before_the_body_is_relayed(tmp_path):
    ex, out, server = exchange(tmp_path, answer(USAGE, b"anthropic-ratelimit-unified-representative-claim: api\r\n"))
    ex.run()
    assert server.guard.snapshot() is not None
    assert out.getvalue().endswith(USAGE)           # the tripping answer itself is relayed in full


def test_accept_encoding_narrowing():
    assert narrow_encodings("br, gzip;q=0.8, zstd") == "gzip;q=0.8"
    assert narrow_encodings("br") == "identity"
    assert narrow_encodings(None) is None
