"""The one place that talks to the upstream API: a lean HTTP/1.1 client with a connection pool.

Built once, never changed per request: keep-alive connections to the one configured
upstream (clients can never choose another), TLS verified against requests' CA bundle,
no proxies or cookies, no retries of a request that reached the upstream, no redirects
followed, and a connect timeout plus a read timeout (no byte for `read_timeout_s`) on
every call.

Why not `requests` or urllib3 on this path: a relay sends bytes through unchanged, and
profiling the gateway under 16 clients showed a third of its CPU in requests' per-call
machinery, then a quarter in urllib3 and `http.client` (whose header parsing goes
through `email.parser`). This module does only what a relay needs: write the request
in one send, read the status line and headers, and hand the body out read by read
(`read1`), de-chunked, exactly as the upstream framed it (Content-Length, chunked, or
until close). requests still supplies the CA bundle and carries webhook alerts.

Errors become `UpstreamError` (502 unreachable, 504 timed out, with a secret-free reason)
before the headers, and `UpstreamReadError` while reading a body.

Thread-safe: the pool is behind a lock; a connection belongs to one request at a time.
"""

import collections
import re
import socket
import ssl
import threading
from urllib.parse import urlsplit

import requests.certs

from .headers import Headers
from .watchdog import readable
from .wire import connection_tokens

CONNECT_TIMEOUT_S = 10
MAX_HEAD_LINE = 65536
MAX_HEAD_LINES = 100
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?\r?\n")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer in time."""

    def __init__(self, status, kind, reason):
        super().__init__(reason)
        self.status = status          # 502 or 504
        self.kind = kind              # Anthropic error type for the client
        self.reason = reason


class UpstreamReadError(Exception):
    """The upstream's body ended early, was malformed, or timed out."""


def _reason(err):
    """A short, secret-free reason for a connection failure."""
    if isinstance(err, ssl.SSLError):
        return "TLS handshake failed"
    if isinstance(err, socket.gaierror):
        return "name resolution failed"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, ConnectionResetError):
        return "connection reset"
    return "connection failed"


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


class Response:
    """The upstream's answer: status and headers read, the body handed out by `read1`."""

    def __init__(self, upstream, conn, status, reason, headers, method):
        self._upstream = upstream
        self.connection = conn            # None once released or closed
        self._conn_lock = threading.Lock()  # abort() comes from the watchdog thread
        self.status = status
        self.reason = reason
        self.headers = headers
        self._rfile = conn.rfile
        self._done = False
        self._chunk_left = 0              # chunked: bytes left in the current chunk
        self._crlf_due = False            # chunked: a chunk's trailing CRLF not read yet
        self._reusable = "close" not in connection_tokens(headers)
        codings = [c.strip().lower() for v in headers.get_all("transfer-encoding", []) for c in v.split(",")]
        lengths = {v.strip() for value in headers.get_all("content-length", []) for v in value.split(",")}
        if len(lengths) > 1:
            raise UpstreamError(502, "api_error", "upstream unreachable: upstream sent conflicting lengths")
        length = lengths.pop() if lengths else None
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            self._framing, self._left = "none", 0
            self._done = True
        elif codings:
            if codings[-1] != "chunked":
                raise UpstreamError(502, "api_error", "upstream unreachable: upstream sent a body framing "
                                                      "dario cannot read")
            self._framing = "chunked"
        elif length is not None:
            if not (length.strip().isdigit() and len(length.strip()) <= 18):
                raise UpstreamError(502, "api_error", "upstream unreachable: upstream sent a malformed "
                                                      "Content-Length")
            self._framing, self._left = "length", int(length)
            self._done = self._left == 0
        else:
            self._framing = "close"
            self._reusable = False

    def read1(self, size=65536):
        """Up to `size` body bytes, as soon as some arrive; b"" at the end. One chunk at most."""
        if self._done:
            return b""
        try:
            if self._framing == "length":
                data = self._read_some(min(size, self._left))
                self._left -= len(data)
                self._done = self._left == 0
                return data
            if self._framing == "close":
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
            size_text = line.split(b";", 1)[0].strip()
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
        with self._conn_lock:
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

    def abort(self):
        """From another thread: wake a read blocked on this response, and end it.

        The plain-socket shutdown, even for TLS, leaves the SSL object to the reading
        thread. A connection already released to the pool is not touched.
        """
        with self._conn_lock:
            if self.connection is None:
                return
            try:
                socket.socket.shutdown(self.connection.sock, socket.SHUT_RDWR)
            except OSError:
                pass


class Upstream:
    def __init__(self, base_url, read_timeout_s=600, pool_size=64, connect_timeout_s=CONNECT_TIMEOUT_S):
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
        self._idle = collections.deque()
        self._lock = threading.Lock()
        self._tls_context = None
        if self.tls:
            self._tls_context = ssl.create_default_context(cafile=requests.certs.where())

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

    def _connect(self):
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except socket.timeout:
            raise UpstreamError(504, "timeout_error", "upstream connect timed out") from None
        except OSError as err:
            raise UpstreamError(502, "api_error", f"upstream unreachable: {_reason(err)}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls_context is not None:
                sock = self._tls_context.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self.read_timeout)
        except socket.timeout:
            sock.close()
            raise UpstreamError(504, "timeout_error", "upstream TLS handshake timed out") from None
        except OSError as err:
            sock.close()
            raise UpstreamError(502, "api_error", f"upstream unreachable: {_reason(err)}") from None
        return _Connection(sock)

    # -- one exchange --------------------------------------------------------------

    def send(self, method, path_and_query, headers, body):
        """Send a request and read the response head. Raises UpstreamError."""
        lines = [f"{method} {self.prefix}{path_and_query} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        if body or method not in ("GET", "HEAD"):
            lines.append(f"Content-Length: {len(body or b'')}\r\n")
        head = ("".join(lines) + "\r\n").encode("latin-1")
        conn = self._get()
        if conn is not None:
            try:
                return self._exchange(conn, head, body, method)
            except _Stale:
                pass                # the upstream closed a pooled connection: one fresh try
        return self._exchange(self._connect(), head, body, method, fresh=True)

    def _exchange(self, conn, head, body, method, fresh=False):
        try:
            if body and len(body) > 65536:
                conn.sock.sendall(head)
                conn.sock.sendall(body)
            else:
                conn.sock.sendall(head + (body or b""))
            status, reason, headers = self._read_head(conn.rfile)
        except _Stale:
            conn.close()
            if fresh:
                raise UpstreamError(502, "api_error", "upstream unreachable: upstream closed the connection") from None
            raise
        except socket.timeout:
            conn.close()
            raise UpstreamError(504, "timeout_error", "upstream did not answer in time") from None
        except UpstreamError:
            conn.close()
            raise
        except OSError as err:
            conn.close()
            if not fresh and isinstance(err, (BrokenPipeError, ConnectionResetError)):
                raise _Stale() from None
            raise UpstreamError(502, "api_error", f"upstream unreachable: {_reason(err)}") from None
        try:
            return Response(self, conn, status, reason, headers, method)
        except UpstreamError:
            conn.close()
            raise

    @staticmethod
    def _read_head(rfile):
        while True:
            line = rfile.readline(MAX_HEAD_LINE + 1)
            if not line:
                raise _Stale()
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

    def close(self):
        with self._lock:
            idle, self._idle = list(self._idle), collections.deque()
        for conn in idle:
            conn.close()


class _Stale(Exception):
    """A connection ended before any answer: on a pooled one, the upstream had closed it."""


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
            items.append((name.decode("latin-1"), value.strip(b" \t\r\n").decode("latin-1")))
    else:
        raise UpstreamError(502, "api_error", "upstream unreachable: upstream sent too many headers")
    if folded:
        items = [(n, v) for n, v in items if n.lower() not in folded]
    return Headers(items)
