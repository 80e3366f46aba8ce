"""Who may talk to the gateway: Host (DNS rebinding), browser origins, and the API key.

Each check takes the settings and the request's headers and either passes (returns
None) or raises `HttpError` with the answer to give. The key comparison is done on
bytes with `hmac.compare_digest`, so it is constant-time and a non-ASCII key is simply
a mismatch.

Pure functions over immutable settings: safe from any thread.
"""

import hmac

from .wire import HttpError, bearer

LOOPBACK_HOST_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})


def host_name(value):
    """The name part of a Host header, lowercased ('' when there is none)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1:]
        if end <= 0 or not (rest in ("", ":") or (rest[0] == ":" and rest[1:].isdigit())):
            return ""                   # "[::1]evil.example" is not [::1]
        return value[:end + 1]
    name, sep, port = value.rpartition(":")
    if sep and (port.isdigit() or port == ""):
        return name
    return value


def check_host(settings, headers):
    """While bound to loopback, only loopback names (and allowedHosts) may be used."""
    if not settings.bound_to_loopback:
        return
    values = headers.get_all("Host") or []
    if len(values) > 1:
        raise HttpError(400, "more than one Host header")
    name = host_name(values[0]) if values else ""
    if not name or (name not in LOOPBACK_HOST_NAMES and name not in settings.allowed_hosts):
        raise HttpError(403, "Host header not allowed: dario only answers requests addressed to "
                             "localhost, 127.0.0.1 or [::1] (add others to config allowedHosts)")


def allowed_origin(settings, headers):
    """The request's Origin if it is configured as allowed, else None."""
    origin = headers.get("Origin")
    if origin is not None and origin in settings.allowed_origins:
        return origin
    return None


def check_browser(settings, headers):
    """Refuse cross-site browser requests: a foreign Origin or Sec-Fetch-Site: cross-site."""
    origin = headers.get("Origin")
    if origin is not None and origin not in settings.allowed_origins:
        raise HttpError(403, "cross-origin requests are not allowed (add the origin to config "
                             "allowedOrigins to permit it)")
    if (headers.get("Sec-Fetch-Site") or "").strip().lower() == "cross-site" and origin is None:
        raise HttpError(403, "cross-site browser requests are not allowed")


def _matches(candidate, key_bytes):
    if candidate is None:
        return False
    return hmac.compare_digest(candidate.strip().encode("latin-1", "replace"), key_bytes)


def check_key(settings, headers):
    """With DARIO_API_KEY set, the request must carry it (see SPEC section 4)."""
    if not settings.api_key:
        return
    key = settings.api_key.encode("utf-8")
    candidates = [headers.get("x-dario-api-key"), bearer(headers.get("Proxy-Authorization"))]
    if settings.upstream_api_key:
        # The client's own credential headers are replaced upstream, so they may carry it.
        candidates += [headers.get("x-api-key"), bearer(headers.get("Authorization"))]
    # Compare against every candidate so timing does not reveal which header was used.
    ok = False
    for candidate in candidates:
        ok |= _matches(candidate, key)
    if not ok:
        raise HttpError(401, "missing or wrong dario API key: send the value of DARIO_API_KEY as "
                             "the x-dario-api-key header (or Proxy-Authorization: Bearer). Claude Code: "
                             'ANTHROPIC_CUSTOM_HEADERS="x-dario-api-key: <key>"')
