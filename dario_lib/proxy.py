"""The way to the upstream through a corporate proxy: which proxy, the CONNECT tunnel, TLS trust.

`choose()` decides once, at start-up, whether the upstream is reached through an HTTP
proxy: the configured one (`upstream.proxy`, `--upstream-proxy`, `DARIO_UPSTREAM_PROXY`)
wins; the value `direct` (or `none`, or an empty flag) means no proxy at all. Otherwise
`https_proxy`/`HTTPS_PROXY` apply, unless `no_proxy`/`NO_PROXY` names the upstream host,
matched as requests matches it (names and domain suffixes with or without a leading dot,
`*` alone for every host, IP addresses, CIDR ranges, `host:port` entries). A configured
proxy ignores NO_PROXY: there is one upstream, and naming a proxy for it is explicit.
An `http://` upstream (allowed only on a loopback host) is never proxied, and
`ALL_PROXY`/`HTTP_PROXY` are not read (the upstream is https; ALL_PROXY is often SOCKS).

`dial()` opens one tunnel: TCP to the proxy, `CONNECT host:port`, the proxy's answer read
strictly (bounded, under one deadline), and the raw socket handed back for the caller's
TLS handshake with the upstream, which stays end to end: the proxy sees only the host
name. Failures become `ProxyError` (502 or 504, with a reason that never holds the
proxy's credentials), which upstream.py turns into its own `UpstreamError`.

Only http:// proxies: TLS to the proxy itself would put TLS inside TLS, which the
socket-based upstream client cannot do. Proxy credentials are percent-decoded from the URL,
sent only as `Proxy-Authorization: Basic` on CONNECT, and kept out of repr, `public()`
and every message.

Thread-safe: a ProxyConfig is immutable and `dial()` shares nothing between calls.
"""

import base64
import ipaddress
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

DIRECT = frozenset({"", "direct", "none"})
ALLOWED = ("an http:// proxy URL such as http://[user:password@]host:port, "
           "or direct (also none) for no proxy")
MAX_ANSWER = 16384            # the proxy's status line and headers together
MAX_ANSWER_LINES = 100
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?")
_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")


class ProxyError(Exception):
    """No tunnel: the gateway answers `status` (502 or 504) with this secret-free reason."""

    def __init__(self, status, reason, proxy_status=None):
        super().__init__(reason)
        self.status = status
        self.kind = "timeout_error" if status == 504 else "api_error"   # Anthropic error type
        self.reason = reason
        self.proxy_status = proxy_status        # the proxy's own HTTP status, when it answered


@dataclass(frozen=True)
class ProxyConfig:
    host: str
    port: int
    source: str = "upstream.proxy"      # or the environment variable it came from
    username: str = field(default=None, repr=False)
    password: str = field(default=None, repr=False)

    def public(self):
        """The proxy's URL without credentials (for /status and logs)."""
        return f"http://{_bracketed(self.host)}:{self.port}"

    def authorization(self):
        """The Proxy-Authorization value, or None without credentials."""
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def parse_url(text, source="upstream.proxy"):
    """A ProxyConfig from a proxy URL; ValueError saying what is allowed, never quoting `text`.

    A URL without a scheme is taken as http:// and one without a port uses 80, as requests
    does (`proxy.corp:3128` in HTTPS_PROXY is common).
    """
    if not isinstance(text, str) or any(ord(c) < 33 or ord(c) == 127 for c in text.strip()):
        raise ValueError(ALLOWED)
    text = text.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        host, port = parts.hostname, parts.port
        username, password = parts.username, parts.password
    except ValueError:                  # its message would quote the text: say ours instead
        raise ValueError(ALLOWED) from None
    if parts.scheme == "https":
        raise ValueError("an http:// proxy URL; https:// proxies are not supported: use the "
                         "proxy's http:// address, the tunnel to the upstream is TLS end to end")
    if parts.scheme != "http":
        raise ValueError(ALLOWED + "; socks and other schemes are not supported")
    if not host or parts.path not in ("", "/") or parts.query or parts.fragment or port == 0:
        raise ValueError(ALLOWED)
    if not _valid_host(host):
        raise ValueError(ALLOWED)
    return ProxyConfig(host, port or 80, source,
                       None if username is None else unquote(username),
                       None if password is None else unquote(password))


def mask(text):
    """A valid proxy URL as a user may see it: credentials shown as ***."""
    if text is None or text.strip().lower() in DIRECT:
        return text
    config = parse_url(text)
    if config.username is None:
        return config.public()
    return f"http://***:***@{_bracketed(config.host)}:{config.port}"


def choose(upstream_url, configured=None, env=os.environ):
    """The proxy for the upstream, or None for a direct connection.

    `configured` is the setting `upstream.proxy` (None when unset). Raises ValueError,
    naming the variable but not its value, for an unusable proxy URL in the environment.
    """
    parts = urlsplit(upstream_url)
    if parts.scheme != "https":
        return None                     # plain http upstreams are loopback only
    if configured is not None:
        return None if configured.strip().lower() in DIRECT else parse_url(configured)
    name, value = _variable(env, "https_proxy")
    if not value.strip():
        return None
    if bypassed(parts.hostname, parts.port or 443, _variable(env, "no_proxy")[1]):
        return None
    try:
        return parse_url(value, source=name)
    except ValueError as err:
        raise ValueError(f"{name} is not a usable proxy (expected {err})") from None


def bypassed(host, port, no_proxy):
    """Whether a NO_PROXY value exempts host:port from the proxy, as requests decides.

    IP hosts match IP entries and CIDR ranges (IPv4 and IPv6); names, suffixes, `*` and
    `host:port` entries are urllib's `proxy_bypass_environment`, which requests uses too.
    """
    no_proxy = (no_proxy or "").strip()
    if not no_proxy:
        return False
    if no_proxy == "*":
        return True
    host = host.strip("[]").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        for entry in no_proxy.split(","):
            try:
                if address in ipaddress.ip_network(entry.strip().strip("[]"), strict=False):
                    return True
            except ValueError:          # a name, or an address with a port: urllib's turn
                continue
    from urllib.request import proxy_bypass_environment   # lazy: urllib.request is slow to import
    return proxy_bypass_environment(f"{_bracketed(host)}:{port}", {"no": no_proxy})


def dial(proxy, host, port, timeout, attach=None):
    """A TCP socket tunnelled through `proxy` to host:port, ready for TLS; raises ProxyError.

    `timeout` bounds the connect to the proxy and, as one deadline, the whole answer to
    CONNECT; the socket comes back with `timeout` set, for the TLS handshake. `attach`, if
    given, is called with the socket as soon as it is connected (upstream.py's
    `Cancel.attach`), so another thread can shut it down while CONNECT is in flight.
    """
    deadline = time.monotonic() + timeout
    target = f"{_bracketed(_checked_host(host))}:{int(port)}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    auth = proxy.authorization()
    if auth:
        lines.append(f"Proxy-Authorization: {auth}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
    try:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    except socket.timeout:
        raise ProxyError(504, "proxy connect timed out") from None
    except OSError as err:
        raise ProxyError(502, f"proxy unreachable: {failure_reason(err)}") from None
    try:
        if attach is not None:
            attach(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        status = _read_answer(sock, deadline)
        sock.settimeout(timeout)
    except socket.timeout:
        sock.close()
        raise ProxyError(504, "the proxy did not answer the CONNECT in time") from None
    except OSError as err:
        sock.close()
        raise ProxyError(502, f"proxy connection failed: {failure_reason(err)}") from None
    except ProxyError:
        sock.close()
        raise
    if 200 <= status < 300:
        return sock
    sock.close()
    if status in (401, 407):          # tinyproxy answers wrong credentials with 401
        reason = (f"the proxy did not accept dario's credentials ({status})" if auth
                  else f"the proxy wants credentials ({status})")
        raise ProxyError(502, reason, status)
    raise ProxyError(502, f"the proxy refused the tunnel (HTTP {status})", status)


def tls_context(ca_file=None):
    """The upstream's TLS context: trust `ca_file` (upstream.caFile) alone, else requests' bundle.

    Raises ValueError naming the file when it cannot be loaded (the CLI exits 2 on it).
    """
    import ssl                  # lazy: config imports this module; most commands need no TLS
    if ca_file is None:
        import certifi          # lazy: requests' CA bundle, only needed for an https upstream
        return ssl.create_default_context(cafile=certifi.where())
    try:
        return ssl.create_default_context(cafile=os.path.expanduser(ca_file))
    except OSError as err:      # ssl.SSLError too: not PEM, or no certificate in it
        detail = "no PEM certificate in it" if isinstance(err, ssl.SSLError) else (err.strerror or "unreadable")
        raise ValueError(f"upstream.caFile {ca_file}: cannot load CA certificates ({detail})") from None


# -- helpers ------------------------------------------------------------------------

def _variable(env, lower):
    """(name, value): the lowercase variable wins whenever it is set, even empty, as urllib has it."""
    if lower in env:
        return lower, env[lower]
    return lower.upper(), env.get(lower.upper(), "")


def _read_answer(sock, deadline):
    """The status of the proxy's answer to CONNECT, read to the end of its head and no further
    than what arrives with it; nothing may follow a 2xx head (the upstream has not spoken)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_ANSWER:
            raise ProxyError(502, "the proxy sent an oversized answer")
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout()
        sock.settimeout(left)
        piece = sock.recv(MAX_ANSWER + 4 - len(buf))
        if not piece:
            raise ProxyError(502, "the proxy closed the connection without answering")
        buf += piece
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    found = _STATUS_LINE.fullmatch(lines[0])
    if not found or len(head) > MAX_ANSWER or len(lines) > MAX_ANSWER_LINES:
        raise ProxyError(502, "the proxy sent a malformed answer")
    status = int(found.group(1))
    if 200 <= status < 300 and rest:
        raise ProxyError(502, "the proxy sent data before the tunnel was used")
    return status


def failure_reason(err):
    """A short, secret-free reason for a failed connection (to the proxy or the upstream)."""
    if isinstance(err, ssl.SSLError):
        return "TLS handshake failed"
    if isinstance(err, socket.gaierror):
        return "name resolution failed"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, ConnectionResetError):
        return "connection reset"
    if isinstance(err, BrokenPipeError):
        return "connection closed"
    return "connection failed"


def _valid_host(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_NAME.fullmatch(host))


def _checked_host(host):
    """The upstream host is validated config; a stray CR, LF or space would forge lines."""
    if not _valid_host(host.strip("[]")):
        raise ValueError("not a host name or IP address")
    return host.strip("[]")


def _bracketed(host):
    return f"[{host}]" if ":" in host else host
