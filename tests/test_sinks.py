"""Every sink of untrusted text, driven for real: hostile model names, claims, account
labels and bodies go in through real sockets, and what comes out is checked where it
lands: the stderr of a `python3 dario.py proxy` process, `dario status` and `dario
resume`, the notify-send arguments, a real notifyCommand's stdin and environment, and
/metrics parsed back by the Prometheus client's own parser. (The TUI's sink is in
test_tui.py, which drives it in tmux.)
"""

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from dario_lib.notify import Notifier

from .helpers import make_settings, running_gateway, wait_until
from .test_cli import Gateway, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What must never reach a terminal raw: C0 (but the line ends), DEL, C1, bidi controls,
# line separators, lone surrogates.
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
# A model name as a hostile client sends it (JSON escapes: the body itself is ASCII).
HOSTILE_MODEL_JSON = r'claude-\u001b[31mRED\u001b[0m\u001b]0;pwned\u0007\u202e\u009b2J'
HOSTILE_MODEL_SHOWN = r"claude-\x1b[31mRED\x1b[0m\x1b]0;pwned\x07\u202e\x9b2J"


def same_text(got, want):
    """`got` is `want`, where each U+FFFD in `want` stands for whatever replaced a lone
    surrogate on the way ("?" or U+FFFD: the relay may clean request text before a sink does)."""
    pattern = "".join("[?\ufffd]" if ch == "\ufffd" else re.escape(ch) for ch in want)
    return re.fullmatch(pattern, got, re.S) is not None


def post_raw(port, model_json, headers=None, key="client-key"):
    """POST /v1/messages whose body names `model_json` (already JSON-escaped) as the model."""
    body = ('{"model": "%s", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}'
            % model_json).encode()
    return requests.post(f"http://127.0.0.1:{port}/v1/messages", data=body, timeout=10,
                         headers={"content-type": "application/json", "x-api-key": key, **(headers or {})})


@pytest.fixture
def gateways():
    started = []
    yield started
    for gateway in started:
        if gateway.proc.poll() is None:
            gateway.proc.kill()
            gateway.proc.wait()


# -- stderr -------------------------------------------------------------------------

def test_hostile_model_and_account_alias_reach_stderr_inert(home, sim, gateways):
    alias = "team\x1b]0;pwned\x07\x1b[2J"
    (home / "config.json").write_text(json.dumps(
        {"accounts": {alias: hashlib.sha256(b"client-key").hexdigest()}}))
    gateway = Gateway(home, ["--upstream=" + sim.url, "-v"])
    gateways.append(gateway)
    assert post_raw(gateway.port, HOSTILE_MODEL_JSON, {"x-sim-claim": "overage"}).status_code == 200
    assert post_raw(gateway.port, r"claude-\ud800").status_code == 503
    requests.post(gateway.url + "/admin/resume", json={})
    assert gateway.stop() == 0
    log = re.sub(r"\x07(?=\[dario\] )", "", gateway.log)     # dario's own bell, rung at a halt
    assert RAW.search(log) is None, [line for line in log.splitlines() if RAW.search(line)]
    halted = next(line for line in log.splitlines() if "HALTED" in line)
    assert halted.startswith("[dario] ") and HOSTILE_MODEL_SHOWN in halted
    assert r"team\x1b]0;pwned\x07\x1b[2J" in halted
    assert "Traceback" not in log


# -- dario status and dario resume ---------------------------------------------------

# An account alias from the config file reaches every sink untouched by the relay, so it
# carries a lone surrogate to the sink itself however the relay cleans request text.
SURROGATE_ALIAS = {"accounts": {"team-\ud800": hashlib.sha256(b"client-key").hexdigest()}}


def test_status_while_halted_by_a_surrogate_model_exits_0(sim, home):
    (home / "config.json").write_text(json.dumps(SURROGATE_ALIAS))
    with running_gateway(make_settings(home, sim.url)) as gateway:
        assert post_raw(gateway.port, r"claude-\ud800" + HOSTILE_MODEL_JSON[6:],
                        {"x-sim-claim": "overage"}).status_code == 200
        assert gateway.guard.snapshot() is not None
        result, as_json = status_of(gateway.port, home)
    # Bytes, not text: the output itself must be valid UTF-8.
    stdout, stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
    assert result.returncode == 0 and "Traceback" not in stderr, stderr
    cause = next(line for line in stdout.splitlines() if "cause:" in line)
    assert "HALTED" in stdout and same_text(cause.split("cause:")[1].split(" (account")[0].strip(),
                                            "claude-\ufffd" + HOSTILE_MODEL_SHOWN[6:])
    assert "(account team-\ufffd)" in cause
    assert RAW.search(stdout) is None
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["guard"]["state"] == "halted"


def status_of(port, home):
    """(`dario status` as bytes, `dario status --json` as text), both run as the user runs them."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "dario.py"), "status", f"--port={port}"],
                            capture_output=True, env=cli_env(home), timeout=30, stdin=subprocess.DEVNULL)
    return result, run(["status", f"--port={port}", "--json"], home)


def cli_env(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARIO_")}
    env["DARIO_HOME"] = str(home)
    return env


class Impostor:
    """Not a dario gateway: answers every request with `status` and `body` (bytes)."""

    def __init__(self, status, body):
        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="impostor", daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def impostor():
    started = []

    def start(status, body):
        server = Impostor(status, body)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


HOSTILE_BODY = ("\x1b]0;pwned\x07\x1b[2J\x9b31m\u202e\r\n[dario] Resumed at now. All good.\n" + "A" * 5000).encode()


@pytest.mark.parametrize("command", ["status", "resume"])
def test_another_programs_body_is_quoted_inert_and_capped(home, impostor, command):
    server = impostor(500, HOSTILE_BODY + b"\xff\xfe")
    result = run([command, f"--port={server.port}"], home)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stdout == ""     # one line: the body cannot add one
    assert RAW.search(result.stderr) is None
    assert f"{command.title()} request returned HTTP 500. Body: \\x1b]0;pwned\\x07\\x1b[2J" in result.stderr
    body = result.stderr.split("Body: ", 1)[1].rstrip("\n")
    assert len(body) == 500 and body.endswith("...")


def test_status_of_an_unexpected_shape_is_one_line_not_a_traceback(home, impostor):
    server = impostor(200, json.dumps({"guard": 5, "version": "\x1b[31m"}).encode())
    result = run(["status", f"--port={server.port}"], home)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and "cannot read" in result.stderr


# -- desktop notifications ------------------------------------------------------------

HOSTILE_CLAIM = '<a href="https://evil.example/">refund</a>&<b>$(id)</b>'


def test_notify_send_gets_markup_and_controls_neutralised_and_no_secrets(sim, home, monkeypatch):
    monkeypatch.setenv("DARIO_API_KEY", "gw-secret-for-notify-test")
    monkeypatch.setenv("DARIO_UPSTREAM_API_KEY", "up-secret-for-notify-test")
    monkeypatch.setenv("SECRET_COPY", "gw-secret-for-notify-test")
    calls, done = [], threading.Event()

    class Done:
        def wait(self, timeout=None):
            return 0

    def spawn(argv, **kwargs):
        calls.append((argv, kwargs))
        done.set()
        return Done()

    notifier = Notifier(platform="linux", spawn=spawn, stream=io.StringIO())
    settings = make_settings(home, sim.url, env={"DARIO_API_KEY": "gw-secret-for-notify-test"})
    with running_gateway(settings, notifier=notifier) as gateway:
        resp = post_raw(gateway.port, HOSTILE_MODEL_JSON, {"x-sim-claim": HOSTILE_CLAIM,
                                                           "x-dario-api-key": "gw-secret-for-notify-test"})
        assert resp.status_code == 200 and gateway.guard.snapshot() is not None
        assert done.wait(5)
    argv, kwargs = calls[0]
    assert argv[:2] == ["notify-send", "--"]
    for text in argv[2:]:
        assert RAW.search(text) is None and not set(text) & set("\"'`$\\")
    body = argv[3]
    assert "<" not in body and ">" not in body and "&lt;a href=https://evil.example/&gt;refund&lt;/a&gt;&amp;" in body
    env = kwargs["env"]
    assert "PATH" in env
    assert not {"DARIO_API_KEY", "DARIO_UPSTREAM_API_KEY", "SECRET_COPY"} & set(env)
    assert kwargs.get("shell", False) is False


# -- notifyCommand ---------------------------------------------------------------------

DUMP = """\
import json, os, sys
out, env = sys.argv[1], sys.argv[2]
with open(out, "ab") as f:
    f.write(sys.stdin.buffer.read() + b"\\n")
with open(env, "w") as f:
    json.dump(dict(os.environ), f)
"""


def strict_json(data):
    """Parse as a strict receiver would: UTF-8 only, and no string holding a lone surrogate."""
    value = json.loads(data.decode("utf-8"))

    def walk(node):
        if isinstance(node, str):
            node.encode("utf-8")                # raises on a lone surrogate
        elif isinstance(node, dict):
            for key, item in node.items():
                walk(key)
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)
    walk(value)
    return value


def test_notify_command_gets_valid_json_on_stdin_and_no_secrets(home, sim, tmp_path, gateways):
    script, out, env_file = tmp_path / "dump.py", tmp_path / "events.jsonl", tmp_path / "env.json"
    script.write_text(DUMP)
    secrets = {"DARIO_API_KEY": "gw-secret-5f1e8a", "DARIO_UPSTREAM_API_KEY": "sk-ant-up-secret-77c2",
               "DARIO_STORE_PASSWORD": "store-pass-0b9d"}
    # With DARIO_UPSTREAM_API_KEY set, the account is the upstream key's.
    alias = {"team-\ud800": hashlib.sha256(secrets["DARIO_UPSTREAM_API_KEY"].encode()).hexdigest()}
    (home / "config.json").write_text(json.dumps(
        {"notifyCommand": [sys.executable, str(script), str(out), str(env_file)], "accounts": alias}))
    gateway = Gateway(home, ["--upstream=" + sim.url], env={
        **secrets, "KEY_COPY": secrets["DARIO_API_KEY"],
        "HOOK_URL": "https://hooks.example/x?token=" + secrets["DARIO_UPSTREAM_API_KEY"], "KEEP_ME": "yes"})
    gateways.append(gateway)
    resp = post_raw(gateway.port, r"claude-\ud800\u001b[31m", {"x-sim-claim": "overage",
                                                                "x-dario-api-key": secrets["DARIO_API_KEY"]})
    assert resp.status_code == 200
    assert wait_until(lambda: out.exists() and env_file.exists() and env_file.stat().st_size > 0, timeout=10)
    assert gateway.stop() == 0
    data = out.read_bytes().rstrip(b"\n")
    data.decode("ascii")                            # ensure_ascii output
    event = strict_json(data)
    assert event["event"] == "halt" and same_text(event["request"]["model"], "claude-\ufffd\x1b[31m")
    assert event["request"]["account"] == "team-\ufffd"
    env = json.loads(env_file.read_text())
    assert env.get("KEEP_ME") == "yes" and "PATH" in env
    leaked = [name for name, value in env.items() if any(s in value for s in secrets.values())]
    assert leaked == [] and not set(secrets) & set(env)


# -- /metrics --------------------------------------------------------------------------

HOSTILE_MODELS = {  # as sent (JSON-escaped) -> as /metrics must give it back
    r'claude-\"quoted\"': 'claude-"quoted"',
    r"back\\slash\\": "back\\slash\\",
    r"new\nline": "new\nline",
    r"claude-\ud800": "claude-\ufffd",
    r"\u001b[31mred": "\x1b[31mred",
    r'x} y{z=\"1\"} 5': 'x} y{z="1"} 5',
}


def test_metrics_with_hostile_labels_parse_back(sim, home):
    parser = pytest.importorskip("prometheus_client.parser")
    (home / "config.json").write_text(json.dumps(SURROGATE_ALIAS))
    with running_gateway(make_settings(home, sim.url)) as gateway:
        for model in HOSTILE_MODELS:
            assert post_raw(gateway.port, model).status_code == 200
        assert wait_until(lambda: gateway.store.summary()["requests"] == len(HOSTILE_MODELS))
        resp = requests.get(f"http://127.0.0.1:{gateway.port}/metrics", timeout=10)
    assert resp.status_code == 200
    resp.content.decode("utf-8")                    # strict
    families = {family.name: family for family in parser.text_string_to_metric_families(resp.text)}
    requests_total = families["dario_requests"]     # the parser drops the counter's _total
    counts = {sample.labels["model"]: sample.value for sample in requests_total.samples
              if sample.name == "dario_requests_total"}
    assert {sample.labels["account"] for sample in requests_total.samples} == {"team-\ufffd"}
    assert sorted(counts.values()) == [1.0] * len(HOSTILE_MODELS)
    for shown in HOSTILE_MODELS.values():
        assert [label for label in counts if same_text(label, shown)], (shown, counts)
