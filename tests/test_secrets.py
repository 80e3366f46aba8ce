"""Secrets never leak: a real `python dario.py proxy -v --log-file=...` is driven through a
day's worth of traffic (ok, streamed, refused, halted, unreachable upstream) with
distinctive random credentials, and then every place a secret could surface is scanned:
stderr, the log file, /status, /analytics, /admin/resume, the SSE feed, guard-state.json,
and every answer the gateway gave (headers and body).
"""

import secrets
import socket
import threading

import pytest
import requests

from dario_lib.simulator import Simulator

from .hostile_kit import MESSAGE, request_bytes
from .test_cli import Gateway


def fresh(prefix):
    return prefix + secrets.token_hex(16)


class SseTap:
    """Reads /analytics/stream on a thread until the gateway closes it."""

    def __init__(self, port, key):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(request_bytes("GET", "/analytics/stream", [("x-dario-api-key", key)]))
        self.data = b""
        self.thread = threading.Thread(target=self._read, name="sse-tap", daemon=True)
        self.thread.start()

    def _read(self):
        try:
            while piece := self.sock.recv(65536):
                self.data += piece
        except OSError:
            pass

    def finish(self):
        self.thread.join(15)
        self.sock.close()
        return self.data


def raw_answer(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while piece := sock.recv(65536):
            out += piece
        return out


@pytest.mark.parametrize("upstream_key", [True, False], ids=["DARIO_UPSTREAM_API_KEY", "pass-through"])
def test_no_secret_appears_anywhere(home, tmp_path, upstream_key):
    gw_key, up_key = fresh("gw-key-"), fresh("sk-ant-upstream-")
    client_key, bearer, wrong = fresh("sk-ant-client-"), fresh("oauth-bearer-"), fresh("gw-wrong-")
    log_path = tmp_path / "records.jsonl"
    env = {"DARIO_API_KEY": gw_key}
    if upstream_key:
        env["DARIO_UPSTREAM_API_KEY"] = up_key
    sim = Simulator().start()
    artifacts = {}
    try:
        gateway = Gateway(home, ["--upstream=" + sim.url, "-v", f"--log-file={log_path}"], env=env)
        port, base = gateway.port, gateway.url
        try:
            tap = SseTap(port, gw_key)
            good = {"x-dario-api-key": gw_key}
            client = {"x-api-key": client_key, "Authorization": "Bearer " + bearer}
            answers = []

            def keep(resp):
                answers.append(f"{resp.status_code} {dict(resp.headers)} {resp.text}")
                return resp

            # Served: plain, streamed, models, with every credential header in play.
            assert keep(requests.post(base + "/v1/messages", json=MESSAGE, headers={**good, **client})).ok
            assert keep(requests.post(base + "/v1/messages", json=dict(MESSAGE, stream=True),
                                      headers={"Proxy-Authorization": "Bearer " + gw_key,
                                               "x-api-key": client_key})).ok
            assert keep(requests.get(base + "/v1/models", headers={**good, "Authorization": "Bearer " + bearer})).ok
            # Refused: no key, wrong keys, foreign Host and Origin, bad framing, unknown path.
            for headers in ({}, {"x-dario-api-key": wrong}, {"Proxy-Authorization": "Bearer " + wrong},
                            {"x-api-key": client_key}, {"Authorization": "Bearer " + bearer}):
                assert keep(requests.post(base + "/v1/messages", json=MESSAGE, headers=headers)).status_code == 401
            assert keep(requests.post(base + "/admin/resume", json={}, headers={"x-dario-api-key": wrong})
                        ).status_code == 401
            for extra in ([("Host", "evil.example")], [("Origin", "https://evil.example")],
                          [("Content-Length", "5"), ("Transfer-Encoding", "chunked")]):
                answers.append(raw_answer(port, request_bytes(
                    "POST", "/v1/messages", [("x-dario-api-key", gw_key), ("x-api-key", client_key),
                                             ("Authorization", "Bearer " + bearer), ("Connection", "close")] + extra,
                    b"{}", host=None if extra[0][0] == "Host" else "127.0.0.1")).decode("latin-1"))
            assert keep(requests.get(base + "/v1/nope", headers={**good, **client})).status_code == 404
            # Halted: the trip, the saved state, the 503.
            assert keep(requests.post(base + "/v1/messages", json=MESSAGE,
                                      headers={**good, **client, "x-sim-claim": "overage"})).ok
            artifacts["guard-state.json"] = (home / "guard-state.json").read_text()
            assert keep(requests.post(base + "/v1/messages", json=MESSAGE, headers={**good, **client})
                        ).status_code == 503
            for path in ("/status", "/analytics", "/admin/resume", "/health"):
                artifacts[path] = keep(requests.get(base + path, headers=good)).text
            assert keep(requests.post(base + "/admin/resume", json={}, headers=good)).json()["wasHalted"]
            # Unreachable upstream: the 502.
            sim.stop()
            assert keep(requests.post(base + "/v1/messages", json=MESSAGE, headers={**good, **client})
                        ).status_code == 502
        finally:
            gateway.stop()
        artifacts["SSE frames"] = tap.finish().decode("latin-1")
        artifacts["stderr"] = gateway.log
        artifacts["log file"] = log_path.read_text()
        artifacts["answers"] = "\n".join(answers)
        seen_upstream = sim.requests
    finally:
        sim.stop()

    assert "overage_halt" in artifacts["SSE frames"] and "overage_resume" in artifacts["SSE frames"]
    assert "OVERAGE GUARD HALTED" in artifacts["stderr"] and "-> 401" in artifacts["stderr"]   # -v was on
    assert artifacts["log file"].count('"outcome"') >= 10
    # The credentials were really in play: the upstream got the one it should.
    forwarded = " ".join(value for req in seen_upstream for _, value in req.headers)
    assert (up_key in forwarded) == upstream_key and (client_key in forwarded) != upstream_key
    assert gw_key not in forwarded and wrong not in forwarded
    for name, secret in (("DARIO_API_KEY", gw_key), ("DARIO_UPSTREAM_API_KEY", up_key), ("x-api-key", client_key),
                         ("bearer token", bearer), ("wrong gateway key", wrong)):
        token = secret.rsplit("-", 1)[1]
        for where, text in artifacts.items():
            assert token[:12] not in text, f"{name} leaked into {where}"
