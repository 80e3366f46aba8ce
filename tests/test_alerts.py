"""notifyCommand and notifyWebhook: delivery, failure handling, and `dario notify-test`."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from dario_lib.alerts import Alerts

from .helpers import make_settings, running_gateway, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Receiver:
    """A local webhook receiver that answers `status` and keeps what it got."""

    def __init__(self, status=200):
        received, self.status = [], status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.headers.get("Content-Type"), json.loads(body)))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def recorder_command(path):
    return [sys.executable, "-c",
            f"import sys; open({str(path)!r}, 'ab').write(sys.stdin.buffer.read() + b'\\n')"]


def read_events(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_halt_and_resume_reach_the_command_and_the_webhook(sim, home, tmp_path, receiver):
    out = tmp_path / "events.jsonl"
    (home / "config.json").write_text(json.dumps({"notifyCommand": recorder_command(out),
                                                  "notifyWebhook": receiver.url}))
    with running_gateway(make_settings(home, sim.url)) as gateway:
        base = f"http://127.0.0.1:{gateway.port}"
        requests.post(base + "/v1/messages", json={"model": "m"}, headers={"x-sim-claim": "overage"})
        requests.post(base + "/admin/resume", json={})
        assert wait_until(lambda: len(read_events(out)) == 2 and len(receiver.received) == 2)
    events = read_events(out)
    assert [e["event"] for e in events] == ["halt", "resume"]
    assert events[0]["reason"] == "overage_detected" and events[0]["request"]["claim"] == "overage"
    assert events[1]["reason"] == "manual" and events[1]["previousReason"] == "overage_detected"
    assert all(e["source"].startswith("dario@") for e in events)
    assert [body["event"] for _, body in receiver.received] == ["halt", "resume"]
    assert receiver.received[0][0] == "application/json"


def test_warn_events_are_delivered(sim, home, tmp_path):
    out = tmp_path / "events.jsonl"
    (home / "config.json").write_text(json.dumps({"notifyCommand": recorder_command(out),
                                                  "overageGuard": {"behavior": "warn"}}))
    with running_gateway(make_settings(home, sim.url)) as gateway:
        requests.post(f"http://127.0.0.1:{gateway.port}/v1/messages", json={}, headers={"x-sim-claim": "api"})
        assert wait_until(lambda: read_events(out))
    assert read_events(out)[0]["event"] == "warn"


def test_failing_channels_are_logged_once_and_never_break_the_gateway(sim, home, caplog):
    broken = Receiver(status=500)
    try:
        (home / "config.json").write_text(json.dumps({
            "notifyCommand": [sys.executable, "-c", "import sys; sys.exit(3)"], "notifyWebhook": broken.url}))
        with running_gateway(make_settings(home, sim.url)) as gateway:
            gateway.alerts._sleep = lambda s: None
            base = f"http://127.0.0.1:{gateway.port}"
            for _ in range(2):
                requests.post(base + "/v1/messages", json={}, headers={"x-sim-claim": "overage"})
                requests.post(base + "/admin/resume", json={})
            assert wait_until(lambda: len(broken.received) == 4 * 3)       # 4 events, 3 attempts each
            assert requests.post(base + "/v1/messages", json={}).status_code == 200
        failures = [r.message for r in caplog.records if "alert channel" in r.message]
        assert len(failures) == 2
        assert any("command failed" in m and "exited 3" in m for m in failures)
        assert any("webhook failed (HTTP 500)" in m for m in failures)
        assert broken.url not in caplog.text          # webhook URLs often carry a token
    finally:
        broken.close()


def test_send_never_blocks_even_when_the_receiver_hangs():
    alerts = Alerts(command=[sys.executable, "-c", "import time; time.sleep(3)"])
    import time
    started = time.monotonic()
    for _ in range(5):
        alerts.send({"event": "halt"})
    assert time.monotonic() - started < 0.5


def run_cli(args, home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARIO_")}
    env.update(DARIO_HOME=str(home), DARIO_OVERAGE_NOTIFY="off")
    return subprocess.run([sys.executable, os.path.join(ROOT, "dario.py"), *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_notify_test_reports_each_channel(home, tmp_path, receiver):
    out = tmp_path / "events.jsonl"
    (home / "config.json").write_text(json.dumps({"notifyCommand": recorder_command(out),
                                                  "notifyWebhook": receiver.url}))
    result = run_cli(["notify-test"], home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "command: ok" in result.stdout and "webhook: ok (HTTP 200)" in result.stdout
    assert read_events(out)[0]["event"] == "test" and receiver.received[0][1]["event"] == "test"
    (home / "config.json").write_text(json.dumps({"notifyCommand": ["definitely-not-a-program-xyz"]}))
    result = run_cli(["notify-test"], home)
    assert result.returncode == 1 and "command: FAILED" in result.stdout and "not found" in result.stdout


def test_a_gateway_starts_without_importing_requests():
    # requests (with certifi, charset_normalizer, idna) is most of a start-up's imports;
    # only a webhook needs it, and imports it when the first one is posted.
    code = ("import sys; from dario_lib import cli, server, alerts; "
            "print(sorted(m for m in ('requests', 'charset_normalizer', 'idna') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
