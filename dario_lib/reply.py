"""One response to a client: the only code that writes response bytes on a client connection.

The handler makes a `Reply` for each request it parses and hands it to whoever answers:
its own endpoints, the relay, the `/analytics/stream` feed. The reply owns every decision
about the bytes on the wire:

- the head: status line, headers, the CORS headers for an allowed origin, and
  `Connection: close` when the connection will close;
- the framing of the body: `Content-Length` for a body known in advance or an upstream
  body of known length, chunked for other bodies to an HTTP/1.1 client, and
  close-delimited to an HTTP/1.0 one; no body at all for `HEAD`, 1xx, 204 and 304;
- whether the connection closes after it (`close`, which the handler reads back);
- whether anything was sent yet (`sent`): once the head is out, a failure can only
  close the connection.

dario's own answers that a retry cannot fix carry `x-should-retry: false`, so the SDKs
and Claude Code fail at once instead of retrying for minutes; answers a retry can fix
(overloaded, timeouts, upstream faults) stay retryable.

One Reply belongs to one request on one handler thread; it is not thread-safe.
"""

import io
import json
from http.server import BaseHTTPRequestHandler

from . import wire

REASONS = {code: phrase for code, (phrase, _) in BaseHTTPRequestHandler.responses.items()}
REASONS[529] = "Overloaded"
# Statuses dario gives itself for a request no retry can fix: the client must change it.
FINAL = frozenset({400, 401, 403, 404, 405, 411, 413, 414, 415, 431, 501, 505})
NO_RETRY = ("x-should-retry", "false")


def _no_body(method, status):
    return method == "HEAD" or 100 <= status < 200 or status in (204, 304)


class Reply:
    __slots__ = ("_wfile", "method", "http10", "close", "body_pending", "sent", "status", "framing",
                 "_extra", "_draining")

    def __init__(self, wfile, method="GET", version="HTTP/1.1", close=False, extra=(),
                 draining=lambda: False):
        self._wfile = wfile
        self.method = method
        self.http10 = version == "HTTP/1.0"
        self.close = close          # the connection closes after this response
        # Until the request body has been read: answering now means closing, so unread
        # body bytes can never be parsed as a next request on a kept-alive connection.
        self.body_pending = False
        self.sent = False           # the head went out
        self.status = None
        self.framing = None         # "none", "length", "chunked" or "close" once started
        self._extra = tuple(extra)  # headers every response carries (CORS for an allowed origin)
        self._draining = draining   # the gateway is shutting down: close after this answer

    # -- whole responses (dario's own answers) ------------------------------------

    def send(self, status, body=b"", content_type="application/json", headers=()):
        """A complete response with its body in hand."""
        lines = [] if status in (204, 304) else [("Content-Type", content_type),
                                                  ("Content-Length", str(len(body)))]
        lines += list(headers)
        head = self._head(status, lines)
        self.framing = "length"
        self._wfile.write(head if _no_body(self.method, status) else head + body)

    def json(self, status, obj, headers=()):
        self.send(status, json.dumps(obj).encode(), headers=headers)

    def error(self, status, kind, message, headers=()):
        """An Anthropic-shaped error; final ones (see FINAL) also say not to retry."""
        headers = list(headers)
        if status in FINAL and not any(name.lower() == NO_RETRY[0] for name, _ in headers):
            headers.append(NO_RETRY)
        self.send(status, wire.error_body(kind, message), headers=headers)

    def http_error(self, err):
        """Answer a `wire.HttpError`."""
        self.error(err.status, err.kind, err.message, err.headers.items())

    def continue_(self):
        """The interim `100 Continue` a client asked for before sending its body."""
        self._wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- streamed responses (relayed answers, event streams) ----------------------

    def start(self, status, headers, length=None, reason=None, body=b""):
        """Send the head of a body that follows in `write()` calls and ends with `end()`.

        `length` is the body's size when known (the upstream said Content-Length):
        the client gets that same framing. Otherwise an HTTP/1.1 client gets chunked
        framing and an HTTP/1.0 client a body that ends when the connection closes.
        `body`, the body's first bytes, goes out in the same write as the head.
        """
        lines = list(headers)
        if _no_body(self.method, status):
            self.framing = "none"
            if length is not None and self.method == "HEAD":
                lines.append(("Content-Length", str(length)))
        elif length is not None:
            self.framing = "length"
            lines.append(("Content-Length", str(length)))
        elif not self.http10:
            self.framing = "chunked"
            lines.append(("Transfer-Encoding", "chunked"))
        else:
            self.framing = "close"
            self.close = True
        head = self._head(status, lines, reason)
        if body and self.framing != "none":
            head += wire.chunk(body) if self.framing == "chunked" else body
        self._wfile.write(head)

    def write(self, data):
        if not data or self.framing == "none":
            return
        self._wfile.write(wire.chunk(data) if self.framing == "chunked" else data)

    def end(self, data=b""):
        """The last bytes of the body (if any) and its end."""
        if self.framing == "chunked":
            self._wfile.write((wire.chunk(data) if data else b"") + wire.LAST_CHUNK)
        elif data:
            self.write(data)

    # -- the head -------------------------------------------------------------

    def _head(self, status, lines, reason=None):
        if self.sent:
            raise RuntimeError("a response was already sent for this request")
        if self._extra:
            lines = lines + list(self._extra)
        if self.body_pending or self._draining():
            self.close = True
        if self.close:
            lines = lines + [("Connection", "close")]
        if reason is None:
            reason = REASONS.get(status, "")
        self.sent = True
        self.status = status
        text = "".join([f"HTTP/1.1 {status} {reason}\r\n", *[f"{n}: {v}\r\n" for n, v in lines], "\r\n"])
        return text.encode("latin-1", "replace")


def prebuilt(status, kind, message, headers=()):
    """The bytes of a whole error answer that closes its connection, built once, for the
    accept loop's over-cap 503 (written where no request was read, so no Reply exists)."""
    out = io.BytesIO()
    Reply(out, close=True).error(status, kind, message, headers)
    return out.getvalue()
