"""HTTP/1.1 details the handler needs: framing, header hygiene and error bodies.

- `read_body` reads a request body framed by `Content-Length` or chunked encoding and
  rejects the framings that enable request smuggling (both headers, conflicting or
  malformed lengths, bad chunk sizes) with `HttpError(400)`, and oversize bodies with
  `HttpError(413)`, before the data is used.
- `relayable` filters headers for relaying in either direction: hop-by-hop headers,
  the ones `Connection` names, and any value with CR, LF or NUL (obsolete line folding
  shows up as an embedded CRLF) never cross the gateway.
- `error_body` builds the Anthropic-shaped error every gateway-made answer carries.

Stateless functions: safe from any thread.
"""

import json
import re

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_OWS = " \t"
_MAX_CHUNK_LINE = 4096
_MAX_TRAILERS = 64

ERROR_KINDS = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
    411: "invalid_request_error", 413: "request_too_large", 414: "invalid_request_error",
    415: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
    500: "api_error", 501: "invalid_request_error", 502: "api_error",
    503: "overloaded_error", 504: "timeout_error", 505: "invalid_request_error",
}


class HttpError(Exception):
    """An answer the gateway gives itself: status, Anthropic error kind, message."""

    def __init__(self, status, message, kind=None, headers=None):
        super().__init__(message)
        self.status = status
        self.kind = kind or ERROR_KINDS.get(status, "api_error")
        self.message = message
        self.headers = headers or {}


def error_object(kind, message, **extra):
    """The Anthropic-shaped error every answer dario makes itself carries (SPEC), as a dict;
    `extra` adds fields to the inner object (the guard's `reason`)."""
    return {"type": "error", "error": {"type": kind, "message": message, **extra}}


def error_body(kind, message, **extra):
    return json.dumps(error_object(kind, message, **extra)).encode()


def bearer(value):
    """The token of an `Authorization`-style `Bearer TOKEN` value, or None."""
    scheme, _, token = (value or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def connection_tokens(headers):
    """Header names listed in `Connection` (lowercase): also hop-by-hop for this message."""
    names = set()
    for value in headers.get_all("Connection") or ():
        names.update(part.strip().lower() for part in value.split(","))
    return names


def relayable(items, named=frozenset(), drop=frozenset()):
    """Yield (name, value) pairs that may cross the gateway."""
    for name, value in items:
        lowered = name.lower()
        if (lowered in HOP_BY_HOP or lowered in named or lowered in drop
                or lowered.startswith("proxy-") or not _TOKEN.fullmatch(name)):
            continue
        if "\r" in value or "\n" in value or "\x00" in value:
            continue
        yield name, value


# -- request bodies -----------------------------------------------------------------

def body_framing(headers, limit):
    """('none'|'length'|'chunked', declared length). Raises HttpError for bad framing."""
    te = headers.get_all("Transfer-Encoding") or []
    cl = headers.get_all("Content-Length") or []
    if te and cl:
        raise HttpError(400, "Content-Length and Transfer-Encoding together are not allowed")
    if te:
        # Only optional whitespace (SP, HTAB) pads a value: "chunked\x0b" is not "chunked".
        codings = [c.strip(_OWS).lower() for value in te for c in value.split(",") if c.strip(_OWS)]
        if codings != ["chunked"]:
            raise HttpError(400, "only Transfer-Encoding: chunked is supported for request bodies")
        return "chunked", None
    if not cl:
        return "none", 0
    values = {v.strip(_OWS) for value in cl for v in value.split(",")}
    if len(values) != 1:
        raise HttpError(400, "conflicting Content-Length values")
    value = values.pop()
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise HttpError(400, "Content-Length must be a non-negative integer")
    length = int(value)
    if length > limit:
        raise HttpError(413, f"request body of {length} bytes is over the {limit}-byte limit")
    return "length", length


class BodyReader:
    """Reads a framed body from a buffered socket file, in bounded pieces. A body over
    64 KiB comes back as a bytearray (read in place), a smaller one as bytes.

    `charge(n)` is called before each piece of a chunked body is read (a declared
    Content-Length is charged by the caller up front); it raises HttpError when the
    gateway's total of request bodies in flight would pass its bound.
    """

    def __init__(self, rfile, limit, charge=None):
        self.rfile = rfile
        self.limit = limit
        self.charge = charge

    def read(self, framing, length):
        if framing == "none":
            return b""
        if framing == "length":
            return self._exact(length)
        return self._chunked()

    def _exact(self, length):
        if length <= 65536:
            data = self.rfile.read(length)
            if len(data) < length:
                raise HttpError(400, "request body ended before Content-Length bytes arrived")
            return data
        # A large body is read straight into its final buffer: joining pieces would hold
        # it twice at the end, and the gateway's memory bound counts it once.
        body = bytearray(length)
        with memoryview(body) as view:
            got = 0
            while got < length:
                n = self.rfile.readinto1(view[got:got + 262144])
                if not n:
                    raise HttpError(400, "request body ended before Content-Length bytes arrived")
                got += n
        return body

    def _line(self):
        line = self.rfile.readline(_MAX_CHUNK_LINE + 1)
        if not line.endswith(b"\n") or len(line) > _MAX_CHUNK_LINE:
            raise HttpError(400, "malformed chunked body")
        return line.rstrip(b"\r\n")

    def _chunked(self):
        body, total = bytearray(), 0
        while True:
            size_text = self._line().split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise HttpError(400, "bad chunk size in chunked body")
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > self.limit:
                raise HttpError(413, f"request body is over the {self.limit}-byte limit")
            if self.charge is not None:
                self.charge(size)
            body += self._exact(size)
            if self.rfile.read(2) != b"\r\n":
                raise HttpError(400, "malformed chunked body")
        for _ in range(_MAX_TRAILERS):
            if not self._line():
                return bytes(body) if len(body) <= 65536 else body
        raise HttpError(400, "too many trailer lines in chunked body")


# -- responses ----------------------------------------------------------------------

def chunk(data):
    """One chunk of a chunked response body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
