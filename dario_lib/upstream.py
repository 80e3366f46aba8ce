"""The one place that talks to the upstream API: one shared, pooled urllib3 connection pool.

The pool is built once and never changed per request: keep-alive connections to the one
configured upstream (clients can never choose another), no retries, no redirects
followed, no proxies or cookies from the environment, a pool sized for the gateway's
threads, certificate checks against requests' CA bundle, and `(connect, read)` timeouts
on every call. Responses are opened unread (`preload_content=False`) so the handler can
relay bytes as they arrive.

Why urllib3 and not a `requests.Session`: the profile of the gateway under 16 clients
showed a third of its CPU in requests' per-call machinery (request preparation, setting
merges, hooks, cookie extraction), which a relay that sends bytes through unchanged does
not need. requests still supplies the CA bundle and carries the webhook alerts.

Errors are translated here into `UpstreamError`, which carries the status the client
should get (502 unreachable, 504 timed out) and a reason with no secrets in it.

Thread-safe: urllib3's pool hands each request its own connection.
"""

import socket
import ssl
from urllib.parse import urlsplit

import requests.certs
import urllib3
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, NameResolutionError, NewConnectionError,
                                ProtocolError, ReadTimeoutError, SSLError)
from urllib3.util import SKIP_HEADER

CONNECT_TIMEOUT_S = 10


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer in time."""

    def __init__(self, status, kind, reason):
        super().__init__(reason)
        self.status = status          # 502 or 504
        self.kind = kind              # Anthropic error type for the client
        self.reason = reason


def _reason(err):
    """A short, secret-free reason for a connection failure."""
    seen = err
    while seen is not None:
        if isinstance(seen, (ssl.SSLError, SSLError)):
            return "TLS handshake failed"
        if isinstance(seen, (socket.gaierror, NameResolutionError)):
            return "name resolution failed"
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, ConnectionResetError):
            return "connection reset"
        seen = seen.__cause__ or seen.__context__ or next(
            (arg for arg in getattr(seen, "args", ()) if isinstance(arg, BaseException)), None)
    text = str(err)
    for hint, reason in (("refused", "connection refused"), ("Name or service", "name resolution failed"),
                         ("getaddrinfo", "name resolution failed"), ("reset", "connection reset"),
                         ("RemoteDisconnected", "upstream closed the connection"),
                         ("BadStatusLine", "upstream sent a malformed response")):
        if hint in text:
            return reason
    return "connection failed"


class Upstream:
    def __init__(self, base_url, read_timeout_s=600, pool_size=64, connect_timeout_s=CONNECT_TIMEOUT_S):
        self.base_url = base_url.rstrip("/")
        self.prefix = urlsplit(self.base_url).path       # a base like http://host/prefix
        self.timeout = urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s)
        kwargs = {"maxsize": pool_size, "block": False, "retries": False, "timeout": self.timeout}
        if self.base_url.startswith("https:"):
            kwargs["ca_certs"] = requests.certs.where()
        self.pool = urllib3.connection_from_url(self.base_url, **kwargs)

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
        if body or method not in ("GET", "HEAD"):
            headers["Content-Length"] = str(len(body or b""))
        try:
            return self.pool.urlopen(method, self.prefix + path_and_query, body=body or None,
                                     headers=headers, retries=False, redirect=False,
                                     preload_content=False, decode_content=False, release_conn=False)
        except NewConnectionError as err:    # first: urllib3 derives it from ConnectTimeoutError
            raise UpstreamError(502, "api_error", f"upstream unreachable: {_reason(err)}") from None
        except ConnectTimeoutError:
            raise UpstreamError(504, "timeout_error", "upstream connect timed out") from None
        except ReadTimeoutError:
            raise UpstreamError(504, "timeout_error", "upstream did not answer in time") from None
        except (SSLError, ProtocolError, OSError) as err:
            raise UpstreamError(502, "api_error", f"upstream unreachable: {_reason(err)}") from None
        except HTTPError as err:
            raise UpstreamError(502, "api_error", f"upstream unreachable: {type(err).__name__}") from None

    def close(self):
        self.pool.close()
