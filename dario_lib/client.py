"""A small HTTP client for the running gateway: what `resume`, `status`, `config set` and
the TUI use.

Stdlib only (`http.client`), always to the loopback address, sending `DARIO_API_KEY`
as `x-dario-api-key` when it is set. Failures come back as two exceptions: the gateway
is not there (`GatewayDown`), or it answered with an error status (`GatewayError`).

Each call opens its own connection, so a Client may be shared between threads.
"""

import http.client
import json
import os

DEFAULT_TIMEOUT_S = 5


class GatewayDown(Exception):
    """Nothing answered on the port (refused, unreachable or timed out)."""


class GatewayError(Exception):
    def __init__(self, status, body):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class Client:
    def __init__(self, port, host="127.0.0.1", api_key=None, timeout=DEFAULT_TIMEOUT_S):
        self.host = host
        self.port = port
        self.api_key = api_key if api_key is not None else os.environ.get("DARIO_API_KEY") or None
        self.timeout = timeout

    def _headers(self, extra=None):
        headers = {"Host": "127.0.0.1", "Accept": "application/json"}
        if self.api_key:
            headers["x-dario-api-key"] = self.api_key
        headers.update(extra or {})
        return headers

    def _connect(self, timeout=None):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)

    def request(self, method, path, body=None):
        """(status, body text) of one request. Raises GatewayDown."""
        conn = self._connect()
        try:
            data = None if body is None else json.dumps(body).encode()
            extra = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=self._headers(extra))
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as err:
            raise GatewayDown(str(err)) from None
        finally:
            conn.close()

    def json(self, method, path, body=None):
        status, text = self.request(method, path, body)
        if not 200 <= status < 300:
            raise GatewayError(status, text)
        try:
            return json.loads(text)
        except ValueError:
            raise GatewayError(status, text) from None

    def status(self):
        return self.json("GET", "/status")

    def analytics(self):
        return self.json("GET", "/analytics")

    def resume(self):
        return self.json("POST", "/admin/resume", {})

    def config(self):
        """GET /admin/config: the gateway's own config file and the values in force."""
        return self.json("GET", "/admin/config")

    def set_config(self, changes):
        """PUT /admin/config: validate, save and apply {dotted name: value} on the
        gateway (a string value is parsed as `config set` parses text; None removes the
        setting from the file). Returns the new state; GatewayError names a rejected value."""
        return self.json("PUT", "/admin/config", {"set": changes})

    def events(self, timeout=60):
        """Yield (event name, data) from /analytics/stream until it ends.

        Records come as ("record", dict); heartbeats are skipped. Raises GatewayDown
        or GatewayError when the stream cannot be opened.
        """
        conn = self._connect(timeout)
        try:
            conn.request("GET", "/analytics/stream", headers=self._headers({"Accept": "text/event-stream"}))
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            raise GatewayDown(str(err)) from None
        if resp.status != 200:
            body = resp.read().decode("utf-8", "replace")
            conn.close()
            raise GatewayError(resp.status, body)
        try:
            name, data = "record", []
            while True:
                line = resp.readline()
                if not line:
                    return
                line = line.rstrip(b"\r\n")
                if not line:
                    if data:
                        try:
                            yield name, json.loads(b"\n".join(data))
                        except ValueError:
                            pass
                    name, data = "record", []
                elif line.startswith(b"event:"):
                    name = line[6:].strip().decode("utf-8", "replace")
                elif line.startswith(b"data:"):
                    data.append(line[5:].lstrip(b" "))
        except (OSError, http.client.HTTPException):
            return
        finally:
            conn.close()
