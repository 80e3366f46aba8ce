"""Shared tools for the adversarial suites (tests/test_hostile_*.py, tests/test_secrets.py).

- `Wire`: one raw client connection that reads whole HTTP/1.1 responses (Content-Length,
  chunked or close-delimited) and can tell "closed" from "idle", so a test can assert
  exactly how many responses came back on a connection.
- `count_responses(raw)`: status lines at the start of each response in a byte stream.
- `no_tracebacks(caplog)`: the gateway logged no exception (no record with exc_info).
- `still_serving(gateway)`: a normal request still gets its answer.
"""

import json
import re
import socket
import time

import requests

MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})[^\r\n]*\r\n")


def url(gateway, path):
    return f"http://127.0.0.1:{gateway.port}{path}"


def health(gateway):
    return requests.get(url(gateway, "/health"), timeout=5).json()["guard"]


def halt(gateway):
    """Trip the guard through a real overage response; returns the halt state."""
    resp = requests.post(url(gateway, "/v1/messages"), json=MESSAGE,
                         headers={"x-api-key": "k", "x-sim-claim": "overage",
                                  **_key_header(gateway)}, timeout=10)
    assert resp.status_code == 200
    assert health(gateway) == "halted"


def _key_header(gateway):
    key = gateway.settings.api_key
    return {"x-dario-api-key": key} if key else {}


def still_serving(gateway, headers=None):
    """A normal generation request succeeds (the gateway kept serving)."""
    resp = requests.post(url(gateway, "/v1/messages"), json=MESSAGE,
                         headers={"x-api-key": "k", **_key_header(gateway), **(headers or {})}, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["type"] == "message"
    return resp


def no_tracebacks(caplog, only=None):
    """The gateway logged no exception at any level (a debug traceback counts too).

    The simulator's own log (it is the far end, and some attacks are aimed through the
    gateway at it) is not the gateway's. `only` limits the check to one logger prefix.
    """
    noisy = [r for r in caplog.records if (r.exc_info or "Traceback" in r.getMessage())
             and not r.name.startswith("dario_lib.simulator")
             and (only is None or r.name.startswith(only))]
    assert noisy == [], [f"{r.name}: {r.getMessage()}" for r in noisy]


def count_responses(raw):
    """Final responses (1xx interim answers excluded) at response boundaries in `raw`."""
    count, pos = 0, 0
    while True:
        found = STATUS_LINE.match(raw, pos)
        if not found:
            return count
        status = int(found.group(1))
        head_end = raw.find(b"\r\n\r\n", pos)
        if head_end < 0:
            return count + 1
        head = raw[pos:head_end].decode("latin-1").lower()
        body_start = head_end + 4
        if 100 <= status < 200:
            pos = body_start
            continue
        count += 1
        length = re.search(r"\r\ncontent-length: *(\d+)", head)
        if length:
            pos = body_start + int(length.group(1))
        elif "transfer-encoding: chunked" in head:
            end = raw.find(b"\r\n0\r\n\r\n", body_start - 2)
            if end < 0:
                return count
            pos = end + 7
        else:
            return count


def parse_json_body(raw):
    return json.loads(raw.partition(b"\r\n\r\n")[2])


def parse_one(buf, eof=False):
    """(status, headers, body, rest) for the first final response in `buf`, None if incomplete.

    1xx interim responses are skipped. A body with neither length nor chunking runs to
    the end of the connection, so it is complete only at `eof`.
    """
    while True:
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        lines = buf[:head_end].decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = buf[head_end + 4:]
        if 100 <= status < 200:
            buf = rest
            continue
        if "content-length" in headers:
            need = int(headers["content-length"])
            if len(rest) < need:
                return None
            return status, headers, rest[:need], rest[need:]
        if headers.get("transfer-encoding") == "chunked":
            end = (b"\r\n" + rest).find(b"\r\n0\r\n\r\n")
            if end < 0:
                return None
            return status, headers, rest[:end], rest[end + 5:]
        return (status, headers, rest, b"") if eof else None


class Wire:
    """A raw client connection to the gateway, for byte-exact attacks."""

    closed = False

    def __init__(self, port, timeout=5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)
        return self

    def _fill(self, deadline):
        """Read once more; False when the peer closed or the deadline passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self.closed:
            return False
        self.sock.settimeout(remaining)
        try:
            piece = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            piece = b""
        if not piece:
            self.closed = True
            return False
        self.buf += piece
        return True

    def response(self, timeout=5.0):
        """The next whole final response as (status, headers, body); None if none came."""
        deadline = time.monotonic() + timeout
        while True:
            found = parse_one(self.buf, self.closed)
            if found is not None:
                status, headers, body, self.buf = found
                return status, headers, body
            if not self._fill(deadline):
                found = parse_one(self.buf, self.closed)
                if found is None:
                    return None
                status, headers, body, self.buf = found
                return status, headers, body

    def closed_within(self, seconds):
        """True if the gateway closed the connection within `seconds` (data read is kept)."""
        deadline = time.monotonic() + seconds
        while not self.closed and self._fill(deadline):
            pass
        return self.closed

    def settle(self, timeout=3.0, idle=0.3):
        """Read until the gateway closes, or until a whole response has been followed by
        `idle` seconds of silence. Returns True if it closed."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            complete = parse_one(self.buf) is not None
            if not self._fill(min(deadline, time.monotonic() + idle) if complete else deadline):
                break
        return self.closed

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def request_bytes(method, path, headers=(), body=b"", host="127.0.0.1"):
    """A raw request; `headers` is a list of (name, value) str pairs sent as latin-1."""
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
