"""The one place that talks to the upstream API, through one shared `requests.Session`.

The session is built once and never changed per request: no proxies or netrc from the
environment (`trust_env = False`), no cookies kept, no retries, no redirects followed,
a connection pool sized for the gateway's threads, and `(connect, read)` timeouts on
every call. Responses are opened with `stream=True` so the handler can relay bytes as
they arrive. requests' exceptions are translated here into `UpstreamError`, which
carries the status the client should get (502 unreachable, 504 timed out) and a reason
with no secrets in it.

Thread-safe: `requests.Session` with a pooled adapter may be shared by request threads
as long as nobody mutates it, and nobody does.
"""

import http.cookiejar
import socket
import ssl

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util import SKIP_HEADER

CONNECT_TIMEOUT_S = 10


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer in time."""

    def __init__(self, status, kind, reason):
        super().__init__(reason)
        self.status = status          # 502 or 504
        self.kind = kind              # Anthropic error type for the client
        self.reason = reason


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    def set_ok(self, cookie, request):
        return False

    def return_ok(self, cookie, request):
        return False


def _reason(err):
    """A short, secret-free reason for a connection failure."""
    seen = err
    while seen is not None:
        if isinstance(seen, (ssl.SSLError, requests.exceptions.SSLError)):
            return "TLS handshake failed"
        if isinstance(seen, socket.gaierror) or "NameResolutionError" in type(seen).__name__:
            return "name resolution failed"
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, ConnectionResetError):
            return "connection reset"
        if isinstance(seen, urllib3.exceptions.MaxRetryError):
            seen = seen.reason
            continue
        seen = seen.__cause__ or seen.__context__ or (seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None)
    text = str(err)
    for hint, reason in (("refused", "connection refused"), ("Name or service", "name resolution failed"),
                         ("getaddrinfo", "name resolution failed"), ("SSL", "TLS handshake failed"),
                         ("reset", "connection reset"), ("RemoteDisconnected", "upstream closed the connection"),
                         ("BadStatusLine", "upstream sent a malformed response")):
        if hint in text:
            return reason
    return "connection failed"


class Upstream:
    def __init__(self, base_url, read_timeout_s=600, pool_size=64, connect_timeout_s=CONNECT_TIMEOUT_S):
        self.base_url = base_url.rstrip("/")
        self.timeout = (connect_timeout_s, read_timeout_s)
        session = requests.Session()
        session.trust_env = False
        session.headers.clear()           # send the client's headers, not requests' defaults
        session.cookies.set_policy(_NoCookies())
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self.session = session

    def send(self, method, path_and_query, headers, body):
        """Open the upstream response (headers read, body not yet). Raises UpstreamError."""
        headers = dict(headers)
        lowered = {name.lower() for name in headers}
        # Without these, urllib3/http.client would add their own User-Agent and
        # Accept-Encoding; the gateway sends only what its client sent.
        if "user-agent" not in lowered:
            headers["User-Agent"] = SKIP_HEADER
        if "accept-encoding" not in lowered:
            headers["Accept-Encoding"] = SKIP_HEADER
        try:
            return self.session.request(
                method, self.base_url + path_and_query, headers=headers,
                data=body if body else None, stream=True, timeout=self.timeout,
                allow_redirects=False)
        except requests.exceptions.ConnectTimeout:
            raise UpstreamError(504, "timeout_error", "upstream connect timed out") from None
        except requests.exceptions.ReadTimeout:
            raise UpstreamError(504, "timeout_error", "upstream did not answer in time") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError) as err:
            raise UpstreamError(502, "api_error", f"upstream unreachable: {_reason(err)}") from None
        except requests.exceptions.RequestException as err:
            raise UpstreamError(502, "api_error", f"upstream unreachable: {type(err).__name__}") from None

    def close(self):
        self.session.close()
