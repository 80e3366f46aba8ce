"""A minimal HTTP/1.1 client over raw sockets, for measuring rather than for general use.

The benchmark wants to see the wire: when each `recv` returned and what it held, so it
can time the first byte of a response, the arrival of every server-sent event and how
many events one read delivered. `requests` hides all of that behind buffering, so this
module builds request bytes once (`build_request`) and parses responses incrementally
(`ResponseParser`) from whatever the socket delivers: Content-Length, chunked and
close-delimited bodies alike.

`Connection` is a blocking keep-alive connection for one thread; `ResponseParser` holds
no socket and is also driven by the selector loops in `loadgen`.
"""

import json
import socket
import time

MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 16,
           "messages": [{"role": "user", "content": "Say hi."}]}
RECV_SIZE = 65536


def message_body(stream=False, pad_bytes=0):
    """A /v1/messages JSON body; `pad_bytes` makes it about that many bytes long."""
    body = dict(MESSAGE, stream=stream) if stream else dict(MESSAGE)
    base = len(json.dumps(body))
    if pad_bytes > base:
        body["messages"] = [{"role": "user", "content": "x" * (pad_bytes - base - 4)}]
    return json.dumps(body, separators=(",", ":")).encode()


def build_request(port, path="/v1/messages", body=b"", headers=None, method="POST"):
    """The bytes of one HTTP/1.1 request to 127.0.0.1:port (keep-alive unless told)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "x-api-key: bench",
             "anthropic-version: 2023-06-01"]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ProtocolError(Exception):
    """The peer sent something that is not a well-formed HTTP/1.1 response."""


class ResponseParser:
    """Incremental parser for one response. Feed bytes; read `done`, `status`, `headers`.

    `feed` returns the body bytes (de-chunked) that the fed data completed, and keeps
    any bytes past the end of this response in `leftover`.
    """

    def __init__(self):
        self._buf = b""
        self._state = "head"
        self._remaining = 0
        self.status = None
        self.headers = {}
        self.framing = None       # "length", "chunked" or "close"
        self.keep_alive = True
        self.done = False
        self.leftover = b""

    def feed(self, data):
        self._buf += data
        out = []
        while not self.done:
            step = getattr(self, "_" + self._state)()
            if step is None:
                break
            out.append(step)
        if self.done:
            self.leftover, self._buf = self._buf, b""
        return b"".join(out)

    def eof(self):
        """The peer closed. Completes a close-delimited body; ProtocolError otherwise."""
        if self.framing == "close" and self._state == "body":
            self.done = True
            self.keep_alive = False
            return
        raise ProtocolError(f"connection closed in the {self._state} of a response")

    def _head(self):
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > 65536:
                raise ProtocolError("response head too long")
            return None
        head, self._buf = self._buf[:end].decode("latin-1"), self._buf[end + 4:]
        status_line, *lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {status_line[:80]!r}")
        self.status = int(parts[1])
        for line in lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.keep_alive = (self.headers.get("connection", "").lower() != "close"
                           and parts[0] == "HTTP/1.1")
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self.framing, self._state = "chunked", "size"
        elif "content-length" in self.headers:
            self.framing, self._state = "length", "body"
            self._remaining = int(self.headers["content-length"])
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self.framing, self.done = "length", True
        else:
            self.framing, self._state, self.keep_alive = "close", "body", False
        if self.framing == "length" and self._remaining == 0:
            self.done = True
        return b""

    def _body(self):
        if not self._buf:
            return None
        if self.framing == "close":
            data, self._buf = self._buf, b""
            return data
        data, self._buf = self._buf[:self._remaining], self._buf[self._remaining:]
        self._remaining -= len(data)
        self.done = self._remaining == 0
        return data

    def _size(self):
        end = self._buf.find(b"\r\n")
        if end < 0:
            return None
        line, self._buf = self._buf[:end], self._buf[end + 2:]
        try:
            self._remaining = int(line.split(b";", 1)[0], 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
        self._state = "chunk" if self._remaining else "trailer"
        return b""

    def _chunk(self):
        if self._remaining:
            if not self._buf:
                return None
            data = self._buf[:self._remaining]
            self._buf = self._buf[len(data):]
            self._remaining -= len(data)
            return data
        if len(self._buf) < 2:
            return None
        if self._buf[:2] != b"\r\n":
            raise ProtocolError("chunk not followed by CRLF")
        self._buf = self._buf[2:]
        self._state = "size"
        return b""

    def _trailer(self):
        end = self._buf.find(b"\r\n")
        if end < 0:
            return None
        line, self._buf = self._buf[:end], self._buf[end + 2:]
        if not line:
            self.done = True
        return b""


class Connection:
    """One blocking keep-alive connection to 127.0.0.1:port, reopened when the server closes."""

    def __init__(self, port, timeout=30.0):
        self.port = port
        self.timeout = timeout
        self.sock = None
        self._leftover = b""

    def _open(self):
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._leftover = b""

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def exchange(self, request, on_data=None):
        """Send one request and read its response.

        Returns (parser, sent_ns, first_byte_ns, body). `on_data(now_ns, body_bytes)` is
        called after every recv that completed some body bytes, for timing streams.
        """
        if self.sock is None:
            self._open()
        parser = ResponseParser()
        sent_ns = time.monotonic_ns()
        self.sock.sendall(request)
        first_ns, body = None, []
        data, self._leftover = self._leftover, b""
        while True:
            if not data:
                data = self.sock.recv(RECV_SIZE)
                now = time.monotonic_ns()
                if first_ns is None:
                    first_ns = now
                if not data:
                    self.close()
                    parser.eof()
                    break
            else:
                now = time.monotonic_ns()
            piece = parser.feed(data)
            data = b""
            if piece:
                body.append(piece)
                if on_data is not None:
                    on_data(now, piece)
            if parser.done:
                break
        if parser.keep_alive:
            self._leftover = parser.leftover
        else:
            self.close()
        return parser, sent_ns, first_ns or time.monotonic_ns(), b"".join(body)


class SseSplitter:
    """Splits a body, fed piece by piece, into server-sent events (bytes up to a blank line)."""

    def __init__(self):
        self._buf = b""

    def feed(self, data):
        self._buf += data
        *events, self._buf = self._buf.split(b"\n\n")
        return events


def event_data(event):
    """(event name, parsed JSON of its data line or None) of one SSE event."""
    name, data = None, None
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            try:
                data = json.loads(line[5:])
            except ValueError:
                data = None
    return name, data
