"""The one place that talks to the upstream API: a lean HTTP/1.1 client with a connection pool.

Built once, never changed per request: keep-alive connections to the one configured
upstream (clients can never choose another), TLS verified against requests' CA bundle,
no cookies, no retries of a request that reached the upstream, no redirects followed,
and a connect timeout plus a read timeout (no byte for `read_timeout_s`) on every call.
Through a corporate proxy (`proxy.choose`: HTTPS_PROXY/NO_PROXY or config
`upstream.proxy`), connections are CONNECT tunnels opened by `proxy.dial`.

Why not `requests` or urllib3 on this path: a relay sends bytes through unchanged, and
profiling the gateway under 16 clients showed a third of its CPU in requests' per-call
machinery, then a quarter in urllib3 and `http.client` (whose header parsing goes
through `email.parser`). This module does only what a relay needs: write the request
in one send, read the status line and headers, and hand the body out read by read
(`read1`), de-chunked, exactly as the upstream framed it (Content-Length, chunked, or
until close).

A request is written upstream at most once. A pooled connection is reused only when it
is proven alive just before the write (nothing readable on it: no close, no stray bytes);
if the upstream closes or resets after any byte of a request was written and before an
answer, the caller gets a 502 saying so and dario never sends the request again (a
second send would be a second generation, and a second bill). The SDKs retry on their
own when they choose to.

The body's framing is decided once, here (`Response.framing`, `Response.length`), from
the upstream's headers (RFC 9112 6.3: Transfer-Encoding wins over Content-Length); the
relay frames its answer to the client from those facts and never reads the upstream's
framing headers itself.

A `Cancel` lets another thread (the watchdog, when the client hangs up) stop an exchange
in any phase: while connecting, while waiting for the answer's head, while reading the
body. Interim 1xx answers are bounded in number.

Errors become `UpstreamError` (502 unreachable, 504 timed out, with a secret-free reason)
before the headers, `ClientGone` when the exchange was cancelled, and
`UpstreamReadError` while reading a body.

Thread-safe: the pool is behind a lock; a connection belongs to one request at a time.
"""

import collections
import re
import socket
import threading
from urllib.parse import urlsplit

from . import proxy as proxy_mod
from .headers import Headers
from .watchdog import readable
from .wire import connection_tokens

CONNECT_TIMEOUT_S = 10
MAX_HEAD_LINE = 65536
MAX_HEAD_LINES = 100
MAX_INTERIM = 10                # 1xx answers before the real one; more is a hostile upstream
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?\r?\n")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_OWS = " \t"                    # the only padding HTTP allows around a value


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer in time."""

    def __init__(self, status, kind, reason, sent=False):
        super().__init__(reason)
        self.status = status          # 502 or 504
        self.kind = kind              # Anthropic error type for the client
        self.reason = reason
        self.sent = sent              # some of the request may have reached the upstream


class UpstreamReadError(Exception):
    """The upstream's body ended early, was malformed, or timed out."""


class ClientGone(Exception):
    """The exchange was cancelled (its client hung up) before the upstream answered."""

    def __init__(self, sent=False):
        super().__init__("the client hung up")
        self.sent = sent              # some of the request may have reached the upstream


class Cancel:
    """Stops one exchange's upstream I/O from another thread (the watchdog).

    The exchange attaches whichever socket it is using; `fire()` shuts that socket down
    (the plain-socket shutdown, even for TLS, leaving the SSL object to the reading
    thread), which wakes a blocked read at once. A socket attached after `fire()` is shut
    down on the spot. A connection is detached before it goes back to the pool, so a
    late `fire()` never touches a pooled connection.
    """

    __slots__ = ("_lock", "_sock", "fired")

    def __init__(self):
        self._lock = threading.Lock()
        self._sock = None
        self.fired = False

    def attach(self, sock):
        with self._lock:
            self._sock = sock
            if self.fired:
                _shutdown(sock)

    def detach(self):
        with self._lock:
            self._sock = None

    def fire(self):
        with self._lock:
            self.fired = True
            if self._sock is not None:
                _shutdown(self._sock)


def _shutdown(sock):
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Connection:
    def __init__(self, sock):
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=65536)

    def alive(self):
        """An idle pooled connection is usable only while nothing at all is readable on it
        (readable means the upstream closed it, or sent something unasked)."""
        return self.sock.fileno() >= 0 and not readable([self.sock])

    def close(self):
        for part in (self.rfile, self.sock):
            try:
                part.close()
            except OSError:
                pass


def _framing(method, status, headers):
    """(framing, length) of an answer's body: "none", "length", "chunked" or "close"."""
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return "none", 0
    te = headers.values("transfer-encoding")
    codings = [c.strip(_OWS).lower() for v in te for c in v.split(",")] if te else ()
    if codings:
        # RFC 9112 6.3: Transfer-Encoding wins; any Content-Length is ignored (and never relayed).
        if codings[-1] != "chunked":
            raise UpstreamError(502, "api_error", "upstream unreachable: upstream sent a body framing "
                                                  "dario cannot read")
        return "chunked", None
    lengths = {v.strip(_OWS) for value in headers.values("content-length") for v in value.split(",")}
    if len(lengths) > 1:
        raise UpstreamError(502, "api_error", "upstream unreachable: upstream sent conflicting lengths")
    if lengths:
        length = lengths.pop()
        if not (length.isascii() and length.isdigit() and len(length) <= 18):
            raise UpstreamError(502, "api_error", "upstream unreachable: upstream sent a malformed "
                                                  "Content-Length")
        return "length", int(length)
    return "close", None


class Response:
    """The upstream's answer: status and headers read, the body handed out by `read1`.

    `framing` ("none", "length", "chunked", "close") and `length` (for "length") say how
    the body is delimited; they are decided here, once.
    """

    def __init__(self, upstream, conn, status, reason, headers, method, cancel):
        self._upstream = upstream
        self.connection = conn            # None once released or closed
        self._cancel = cancel
        self.status = status
        self.reason = reason
        self.headers = headers
        self._rfile = conn.rfile
        self._chunk_left = 0              # chunked: bytes left in the current chunk
        self._crlf_due = False            # chunked: a chunk's trailing CRLF not read yet
        self.framing, self.length = _framing(method, status, headers)
        self._left = self.length or 0
        self._done = self.framing == "none" or (self.framing == "length" and self._left == 0)
        self._reusable = self.framing != "close" and "close" not in connection_tokens(headers)

    def read1(self, size=65536):
        """Up to `size` body bytes, as soon as some arrive; b"" at the end. One chunk at most."""
        if self._done:
            return b""
        try:
            if self.framing == "length":
                data = self._read_some(min(size, self._left))
                self._left -= len(data)
                self._done = self._left == 0
                return data
            if self.framing == "close":
                data = self._rfile.read1(size)
                self._done = not data
                return data
            return self._read_chunk(size)
        except socket.timeout:
            raise UpstreamReadError("upstream went silent mid-body") from None
        except (OSError, ValueError) as err:       # ValueError: the socket was closed under us
            raise UpstreamReadError(f"upstream connection lost mid-body ({type(err).__name__})") from None

    def _read_chunk(self, size):
        if self._chunk_left == 0:
            if self._crlf_due:
                if self._rfile.read(2) != b"\r\n":
                    raise UpstreamReadError("upstream sent a malformed chunk")
                self._crlf_due = False
            line = self._rfile.readline(MAX_HEAD_LINE)
            if not line.endswith(b"\n"):
                raise UpstreamReadError("upstream closed the connection mid-body")
            size_text = line.rstrip(b"\r\n").split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise UpstreamReadError("upstream sent a malformed chunk size")
            self._chunk_left = int(size_text, 16)
            if self._chunk_left == 0:
                for _ in range(MAX_HEAD_LINES):             # trailers, up to the blank line
                    trailer = self._rfile.readline(MAX_HEAD_LINE)
                    if not trailer.endswith(b"\n"):
                        raise UpstreamReadError("upstream closed the connection mid-body")
                    if trailer in (b"\r\n", b"\n"):
                        self._done = True
                        return b""
                raise UpstreamReadError("upstream sent too many trailers")
        data = self._read_some(min(size, self._chunk_left))
        self._chunk_left -= len(data)
        self._crlf_due = self._chunk_left == 0
        return data

    def _read_some(self, limit):
        data = self._rfile.read1(limit)
        if not data:
            raise UpstreamReadError("upstream closed the connection mid-body")
        return data

    def _take(self):
        self._cancel.detach()               # from now on a late cancel cannot reach this socket
        conn, self.connection = self.connection, None
        return conn

    def release_conn(self):
        """The body was read to its end: keep the connection for the next request."""
        conn = self._take()
        if conn is None:
            return
        if self._done and self._reusable and not self._crlf_due:
            self._upstream._put(conn)
        else:
            conn.close()

    def close(self):
        """Drop the connection (a body not read to its end cannot be reused)."""
        conn = self._take()
        if conn is not None:
            conn.close()


class Upstream:
    def __init__(self, base_url, read_timeout_s=600, pool_size=64, connect_timeout_s=CONNECT_TIMEOUT_S,
                 proxy=None, ca_file=None):
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path
        name = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = name if parts.port is None else f"{name}:{self.port}"
        self.connect_timeout = connect_timeout_s
        self.read_timeout = read_timeout_s
        self.pool_size = pool_size
        self.proxy = proxy                  # proxy.ProxyConfig: reach the upstream through CONNECT
        self.ca_file = ca_file              # trust this CA bundle instead of the default one
        self._idle = collections.deque()
        self._lock = threading.Lock()
        self._tls_context = None
        if self.tls and ca_file:
            self._tls()             # an unusable CA file stops start-up (ValueError), not a request

    # -- connections -------------------------------------------------------------

    def _get(self):
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return None
            if conn.alive():
                return conn
            conn.close()

    def _put(self, conn):
        with self._lock:
            if len(self._idle) < self.pool_size:
                self._idle.append(conn)
                return
        conn.close()

    def _tls(self):
        if self._tls_context is None:
            # Built on first use: only a TLS upstream needs the CA bundle, and loading it
            # costs start-up time.
            self._tls_context = proxy_mod.tls_context(self.ca_file)
        return self._tls_context

    def _dial(self, cancel):
        if self.proxy is not None:
            try:
                return proxy_mod.dial(self.proxy, self.host, self.port, self.connect_timeout, attach=cancel.attach)
            except proxy_mod.ProxyError as err:
                if cancel.fired:
                    raise ClientGone() from None
                raise UpstreamError(err.status, err.kind, f"upstream unreachable: {err.reason}") from None
        try:
            return socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except socket.timeout:
            raise UpstreamError(504, "timeout_error", "upstream connect timed out") from None
        except OSError as err:
            raise UpstreamError(502, "api_error", f"upstream unreachable: {proxy_mod.failure_reason(err)}") from None

    def _connect(self, cancel):
        sock = self._dial(cancel)
        cancel.attach(sock)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                sock = self._tls().wrap_socket(sock, server_hostname=self.host)
                cancel.attach(sock)
            sock.settimeout(self.read_timeout)
        except socket.timeout:
            sock.close()
            raise UpstreamError(504, "timeout_error", "upstream TLS handshake timed out") from None
        except OSError as err:
            sock.close()
            if cancel.fired:
                raise ClientGone() from None
            raise UpstreamError(502, "api_error", f"upstream unreachable: {proxy_mod.failure_reason(err)}") from None
        return _Connection(sock)

    # -- one exchange --------------------------------------------------------------

    def send(self, method, path_and_query, headers, body, cancel=None):
        """Send a request once and read the answer's head. Raises UpstreamError or ClientGone."""
        cancel = cancel or Cancel()
        lines = [f"{method} {self.prefix}{path_and_query} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        if body or method not in ("GET", "HEAD"):
            lines.append(f"Content-Length: {len(body or b'')}\r\n")
        head = ("".join(lines) + "\r\n").encode("latin-1")
        conn = self._get()           # proven alive just now, or None
        if conn is None:
            conn = self._connect(cancel)
        else:
            cancel.attach(conn.sock)
        sent = False
        try:
            if cancel.fired:
                raise ClientGone()
            sent = True             # from the first byte on, the upstream may have the request
            if body and len(body) > 65536:
                conn.sock.sendall(head)
                conn.sock.sendall(body)
            else:
                conn.sock.sendall(head + (body or b""))
            status, reason, headers = self._read_head(conn.rfile)
            return Response(self, conn, status, reason, headers, method, cancel)
        except UpstreamError as err:
            self._drop(conn, cancel)
            err.sent = sent
            raise
        except ClientGone:
            self._drop(conn, cancel)
            raise
        except socket.timeout:
            self._drop(conn, cancel)
            raise UpstreamError(504, "timeout_error", "upstream did not answer in time", sent) from None
        except (OSError, ValueError, _Closed) as err:
            self._drop(conn, cancel)
            if cancel.fired:
                raise ClientGone(sent) from None
            if isinstance(err, _Closed) or isinstance(err, (BrokenPipeError, ConnectionResetError)):
                # Some of the request may have reached the upstream: never send it again.
                raise UpstreamError(502, "api_error", "upstream unreachable: the upstream closed the "
                                                      "connection after the request was sent, without "
                                                      "answering (dario never sends a request twice)",
                                    sent) from None
            raise UpstreamError(502, "api_error", f"upstream unreachable: {proxy_mod.failure_reason(err)}", sent) from None

    @staticmethod
    def _drop(conn, cancel):
        cancel.detach()
        conn.close()

    @staticmethod
    def _read_head(rfile):
        for _ in range(MAX_INTERIM + 1):
            line = rfile.readline(MAX_HEAD_LINE + 1)
            if not line:
                raise _Closed()
            found = _STATUS_LINE.fullmatch(line)
            if not found:
                raise UpstreamError(502, "api_error", "upstream unreachable: upstream sent a malformed response")
            status = int(found.group(1))
            headers = _read_response_headers(rfile)
            if status == 101:
                raise UpstreamError(502, "api_error", "upstream unreachable: upstream tried to switch protocols")
            if not 100 <= status < 200:
                reason = (found.group(2) or b"").decode("latin-1")
                return status, reason, headers
            # An interim 1xx answer (100 Continue, 103 Early Hints): the real one follows.
        raise UpstreamError(502, "api_error", f"upstream unreachable: upstream sent more than {MAX_INTERIM} "
                                              "interim answers")

    def close(self):
        with self._lock:
            idle, self._idle = list(self._idle), collections.deque()
        for conn in idle:
            conn.close()


class _Closed(Exception):
    """The upstream closed the connection before any answer."""


def _read_response_headers(rfile):
    """Response headers; folded, malformed or nameless lines are dropped, never relayed."""
    items, folded = [], set()
    for _ in range(MAX_HEAD_LINES):
        line = rfile.readline(MAX_HEAD_LINE + 1)
        if not line.endswith(b"\n"):
            raise UpstreamError(502, "api_error", "upstream unreachable: upstream sent a malformed response")
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if items:
                folded.add(items[-1][0].lower())
            continue
        name, sep, value = line.partition(b":")
        if sep and name and name == name.strip():
            items.append((name.decode("latin-1"), value.rstrip(b"\r\n").strip(b" \t").decode("latin-1")))
    else:
        raise UpstreamError(502, "api_error", "upstream unreachable: upstream sent too many headers")
    if folded:
        items = [(n, v) for n, v in items if n.lower() not in folded]
    return Headers(items)
