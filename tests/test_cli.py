"""The command line, run as a user runs it: `python dario.py ...` in a subprocess."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DARIO = [sys.executable, os.path.join(ROOT, "dario.py")]


def run(args, home, env=None, timeout=20):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DARIO_")}
    environ.update({"DARIO_HOME": str(home)}, **(env or {}))
    return subprocess.run(DARIO + args, capture_output=True, text=True, env=environ, timeout=timeout,
                          stdin=subprocess.DEVNULL)


class Gateway:
    """`python dario.py proxy` as a child process; the port is read from its log."""

    def __init__(self, home, args=(), env=None):
        environ = {k: v for k, v in os.environ.items() if not k.startswith("DARIO_")}
        environ.update({"DARIO_HOME": str(home), "DARIO_OVERAGE_NOTIFY": "off"}, **(env or {}))
        self.proc = subprocess.Popen(DARIO + ["proxy", "--port=0", *args], stderr=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=environ)
        self.lines = []
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError("gateway exited: " + "".join(self.lines))
            self.lines.append(line)
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                break

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        rest = self.proc.communicate(timeout=15)[1]
        self.lines.append(rest)
        return self.proc.returncode

    @property
    def log(self):
        return "".join(self.lines)


@pytest.fixture
def proxy(home, sim):
    gateways = []

    def start(*args, env=None):
        gateway = Gateway(home, ["--upstream=" + sim.url, *args], env)
        gateways.append(gateway)
        return gateway

    yield start
    for gateway in gateways:
        if gateway.proc.poll() is None:
            gateway.proc.kill()
            gateway.proc.wait()


# -- help and mistakes --------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["help"], ["-h"], []])
def test_help_lists_every_command_flag_and_env_var(home, args):
    result = run(args, home)
    assert result.returncode == 0 and result.stderr == ""
    for word in ("proxy", "resume", "status", "config", "--port", "--host", "--upstream", "--log-file",
                 "--overage-guard", "--no-overage-guard", "--overage-behavior", "--overage-cooldown",
                 "--no-overage-notify", "--verbose", "--unsafe-no-auth", "DARIO_HOME", "DARIO_API_KEY",
                 "DARIO_UPSTREAM_API_KEY", "DARIO_OVERAGE_GUARD", "DARIO_VERBOSE", "127.0.0.1:3456"):
        assert word in result.stdout, word


def test_version(home):
    result = run(["--version"], home)
    assert result.returncode == 0 and re.fullmatch(r"dario \d+\.\d+\.\d+\n", result.stdout)


@pytest.mark.parametrize("args, named", [
    (["launch"], "launch"), (["proxy", "--prot=1"], "--prot=1"), (["proxy", "extra"], "extra"),
    (["resume", "--force"], "--force"), (["--frobnicate"], "--frobnicate"),
])
def test_unknown_commands_and_flags_are_one_line_and_exit_2(home, args, named):
    result = run(args, home)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and named in result.stderr and "help" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, env, named", [
    (["proxy", "--port=http"], {}, "--port"),
    (["proxy", "--overage-behavior=nuke"], {}, "--overage-behavior"),
    (["proxy", "--overage-cooldown=-1"], {}, "--overage-cooldown"),
    (["proxy"], {"DARIO_OVERAGE_GUARD": "maybe"}, "DARIO_OVERAGE_GUARD"),
    (["proxy"], {"DARIO_PORT": "99999"}, "DARIO_PORT"),
    (["proxy", "--upstream=http://example.com"], {}, "--upstream"),
])
def test_invalid_values_exit_2_naming_setting_and_allowed(home, args, env, named):
    result = run(args, home, env)
    assert result.returncode == 2 and named in result.stderr and "allowed" in result.stderr


def test_unsafe_bind_refused_without_key(home):
    result = run(["proxy", "--host=0.0.0.0", "--port=0"], home)
    assert result.returncode == 2 and "DARIO_API_KEY" in result.stderr and "--unsafe-no-auth" in result.stderr


def test_last_flag_wins(home, proxy):
    gateway = proxy("--overage-behavior=warn", "--overage-behavior=halt", "--no-overage-guard", "--overage-guard")
    config = requests.get(gateway.url + "/admin/resume").json()["config"]
    assert config["behavior"] == "halt" and config["enabled"] is True
    assert gateway.stop() == 0


# -- running --------------------------------------------------------------------------

def test_sigterm_and_sigint_exit_0(home, proxy):
    for sig in (signal.SIGTERM, signal.SIGINT):
        gateway = proxy()
        assert requests.get(gateway.url + "/health").json()["status"] == "ok"
        assert gateway.stop(sig) == 0
        assert "Traceback" not in gateway.log


def test_port_in_use_exits_1_saying_so(home, proxy):
    first = proxy()
    result = run(["proxy", f"--port={first.port}"], home)
    assert result.returncode == 1 and "another dario gateway is listening there" in result.stderr


def test_broken_config_file_warns_and_still_starts(home, proxy):
    (home / "config.json").write_text("{oops")
    gateway = proxy()
    assert "not valid JSON" in gateway.log
    assert requests.get(gateway.url + "/status").json()["configSource"] == "invalid"


def test_no_traceback_when_a_client_hangs_up(home, proxy):
    gateway = proxy("-v")
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
    sock.close()
    requests.get(gateway.url + "/health")
    assert gateway.stop() == 0 and "Traceback" not in gateway.log


# -- resume and status ----------------------------------------------------------------

NOT_RUNNING = re.compile(r"\[dario\] No gateway running on 127\.0\.0\.1:(\d+)\. Start one with `\S+ \S*dario\.py "
                         r"proxy --port=\1` \(overage-guard state lives in the running gateway; there is "
                         r"nothing to resume on a stopped one\)\.\n")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_resume_with_no_gateway(home):
    port = free_port()
    result = run(["resume", f"--port={port}"], home)
    found = NOT_RUNNING.fullmatch(result.stderr)
    assert result.returncode == 1 and found and found.group(1) == str(port), result.stderr


def test_resume_port_from_env_and_config(home):
    port = free_port()
    assert str(port) in run(["resume"], home, {"DARIO_PORT": str(port)}).stderr
    (home / "config.json").write_text(json.dumps({"port": port}))
    assert str(port) in run(["resume"], home).stderr


def test_resume_not_halted_then_halted(home, proxy):
    gateway = proxy()
    result = run(["resume", f"--port={gateway.port}"], home)
    assert result.returncode == 0
    assert result.stdout == "[dario] Gateway was not halted — no-op. (Overage-guard state was already clear.)\n"
    requests.post(gateway.url + "/v1/messages", json={"model": "m"}, headers={"x-sim-claim": "overage"})
    result = run(["resume", f"--port={gateway.port}"], home)
    assert result.returncode == 0
    assert re.fullmatch(r"\[dario\] Resumed at \d{4}-\d\d-\d\dT[\d:.]+Z\. Gateway returning to normal "
                        r"request handling\.\n", result.stdout)
    assert requests.get(gateway.url + "/health").json()["guard"] == "normal"
    assert gateway.stop() == 0 and "RESUMED (manual)" in gateway.log


def test_resume_and_status_answered_401_say_which_variable_to_set(home, proxy):
    gateway = proxy(env={"DARIO_API_KEY": "gw-key"})
    for command in ("resume", "status"):
        wrong = run([command, f"--port={gateway.port}"], home, {"DARIO_API_KEY": "wrong"})
        assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1
        assert wrong.stderr.startswith(f"[dario] {command.title()} request returned HTTP 401. DARIO_API_KEY is set "
                                       "but the gateway refused it: set it to the gateway's key (it is sent as "
                                       "x-dario-api-key). Body: {")
        unset = run([command, f"--port={gateway.port}"], home)
        assert unset.returncode == 1
        assert "The gateway wants a key: set DARIO_API_KEY to the gateway's key (it is sent as x-dario-api-key)" \
            in unset.stderr
        assert "gw-key" not in wrong.stderr + unset.stderr
    assert run(["resume", f"--port={gateway.port}"], home, {"DARIO_API_KEY": "gw-key"}).returncode == 0


def test_status_running_json_and_absent(home, proxy):
    gateway = proxy()
    requests.post(gateway.url + "/v1/messages", json={"model": "m"}, headers={"x-sim-claim": "overage"})
    text = run(["status", f"--port={gateway.port}"], home)
    assert text.returncode == 0 and "HALTED" in text.stdout and "billed to extra usage" in text.stdout
    assert re.search(r"or now with `\S+ \S*dario\.py resume --port=%d`" % gateway.port, text.stdout)
    as_json = json.loads(run(["status", f"--port={gateway.port}", "--json"], home).stdout)
    assert as_json["guard"]["state"] == "halted"
    absent = run(["status", f"--port={free_port()}"], home)
    assert absent.returncode == 1 and "No gateway running on 127.0.0.1:" in absent.stderr


def test_kill_9_while_halted_restarts_halted(home, proxy):
    first = proxy()
    requests.post(first.url + "/v1/messages", json={"model": "m"}, headers={"x-sim-claim": "overage"})
    state = requests.get(first.url + "/admin/resume").json()["state"]
    first.proc.kill()
    first.proc.wait()
    second = proxy()
    assert "STARTING HALTED" in second.log
    again = requests.get(second.url + "/admin/resume").json()["state"]
    assert again["since"] == state["since"] and again["cooldownUntil"] == state["cooldownUntil"]
    assert requests.post(second.url + "/v1/messages", json={"model": "m"}).status_code == 503


# -- config ---------------------------------------------------------------------------

def test_config_path_get_set_show(home):
    assert run(["config", "path"], home).stdout.strip() == str(home / "config.json")
    assert run(["config", "get", "overageGuard.cooldownMs"], home).stdout.strip() == "1800000"
    (home / "config.json").write_text(json.dumps({"custom": {"mine": True}}))
    port = free_port()                              # no gateway answers there: the file is edited
    result = run(["config", "set", "overageGuard.behavior", "warn"], home, {"DARIO_PORT": str(port)})
    assert result.returncode == 0
    assert result.stdout == (f'[dario] overageGuard.behavior = "warn" saved to {home / "config.json"} (no gateway '
                             f"answers on 127.0.0.1:{port}; a gateway reads the file when it starts, or on SIGHUP)\n")
    assert json.loads((home / "config.json").read_text()) == {"custom": {"mine": True},
                                                               "overageGuard": {"behavior": "warn"}}
    shown = json.loads(run(["config", "show"], home).stdout)
    assert shown["settings"]["overageGuard.behavior"] == "warn" and shown["source"] == "file"


def test_config_show_get_and_set_mask_credentials(home):
    port = str(free_port())
    proxy_url, store_url = "http://user:hunter2@127.0.0.1:3128", "redis://:hunter3@127.0.0.1:6379/0"
    for key, value in (("upstream.proxy", proxy_url), ("store.url", store_url)):
        result = run(["config", "set", key, value, f"--port={port}"], home)
        assert result.returncode == 0 and "hunter" not in result.stdout + result.stderr
    assert json.loads((home / "config.json").read_text())["upstream"]["proxy"] == proxy_url
    shown = run(["config", "show"], home).stdout
    assert "hunter" not in shown
    settings = json.loads(shown)["settings"]
    assert settings["upstream.proxy"] == "http://***:***@127.0.0.1:3128"
    assert settings["store.url"] == "redis://***@127.0.0.1:6379/0"
    assert run(["config", "get", "store.url"], home).stdout == '"redis://***@127.0.0.1:6379/0"\n'
    assert run(["config", "get", "upstream.proxy"], home).stdout == '"http://***:***@127.0.0.1:3128"\n'


def test_config_set_goes_through_the_gateway_that_answers_on_the_port(home, proxy, tmp_path):
    gateway = proxy("--overage-cooldown=60000")
    caller = tmp_path / "caller-home"               # the caller's own DARIO_HOME is another folder
    caller.mkdir()
    result = run(["config", "set", "overageGuard.behavior", "warn", f"--port={gateway.port}"], caller)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f'[dario] overageGuard.behavior = "warn" saved to {home / "config.json"} and applied '
                             f"by the gateway on 127.0.0.1:{gateway.port}\n")
    assert json.loads((home / "config.json").read_text()) == {"overageGuard": {"behavior": "warn"}}
    assert not (caller / "config.json").exists()
    assert requests.get(gateway.url + "/admin/resume").json()["config"]["behavior"] == "warn"
    # The port from DARIO_PORT works the same; a restart setting is saved for the restart.
    later = run(["config", "set", "maxRecords", "50"], caller, {"DARIO_PORT": str(gateway.port)})
    assert later.stdout.endswith(f"saved to {home / 'config.json'}; the gateway on 127.0.0.1:{gateway.port} "
                                 "applies it when it restarts\n")
    # A flag outranks the file: saved, and the caller is told.
    flagged = run(["config", "set", "overageGuard.cooldownMs", "5000", f"--port={gateway.port}"], caller)
    assert flagged.returncode == 0
    assert "takes overageGuard.cooldownMs from its flag, which outranks the file" in flagged.stderr
    assert requests.get(gateway.url + "/admin/resume").json()["config"]["cooldownMs"] == 60000
    # A bad value is refused before anything is sent.
    assert run(["config", "set", "overageGuard.behavior", "nuke", f"--port={gateway.port}"], caller).returncode == 2
    assert json.loads((home / "config.json").read_text())["overageGuard"] == {"behavior": "warn", "cooldownMs": 5000}
    assert gateway.stop() == 0 and "config changed through PUT /admin/config" in gateway.log


def test_config_set_answered_401_says_which_variable_to_set(home, proxy, tmp_path):
    gateway = proxy(env={"DARIO_API_KEY": "gw-key"})
    caller = tmp_path / "caller-home"
    caller.mkdir()
    refused = run(["config", "set", "overageGuard.behavior", "warn", f"--port={gateway.port}"], caller)
    assert refused.returncode == 1 and "The gateway wants a key: set DARIO_API_KEY" in refused.stderr
    assert not (home / "config.json").exists() and not (caller / "config.json").exists()
    done = run(["config", "set", "overageGuard.behavior", "warn", f"--port={gateway.port}"], caller,
               {"DARIO_API_KEY": "gw-key"})
    assert done.returncode == 0 and "gw-key" not in done.stdout + done.stderr


@pytest.mark.parametrize("args", [["set", "overageGuard.behavior", "nuke"], ["set", "overageGuard.cooldownMs", "-5"],
                                  ["set", "nope", "1"], ["get", "nope"], ["frob"], ["set", "port"]])
def test_config_rejects_invalid_keys_and_values(home, args):
    result = run(["config", *args], home)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not (home / "config.json").exists()


def test_config_set_refuses_to_clobber_a_broken_file(home):
    (home / "config.json").write_text("{broken")
    result = run(["config", "set", "port", "4000"], home)
    assert result.returncode == 1 and (home / "config.json").read_text() == "{broken"


def test_sighup_reloads_the_config_file(home, proxy):
    gateway = proxy()
    (home / "config.json").write_text(json.dumps({"overageGuard": {"behavior": "warn", "cooldownMs": 5000},
                                                  "maxRecords": 50}))
    gateway.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        config = requests.get(gateway.url + "/admin/resume").json()["config"]
        if config["behavior"] == "warn":
            break
        time.sleep(0.05)
    assert config == {"enabled": True, "behavior": "warn", "cooldownMs": 5000, "notifyOs": False}
    assert gateway.stop() == 0
    assert "config reloaded" in gateway.log and "maxRecords change(s) need a restart" in gateway.log


def test_sd_notify_ready(home, sim, tmp_path):
    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(10)
    gateway = Gateway(home, ["--upstream=" + sim.url], env={"NOTIFY_SOCKET": path})
    try:
        assert listener.recv(100) == b"READY=1"
        gateway.stop()
        assert listener.recv(100) == b"STOPPING=1"
    finally:
        listener.close()
        if gateway.proc.poll() is None:
            gateway.proc.kill()


def test_demo_runs_offline(home):
    result = run(["demo"], home, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HTTP 503" in result.stdout and "dario_overage_guard" in result.stdout
    assert "Resumed at" in result.stdout and "OVERAGE GUARD HALTED" in result.stderr
    assert not list(home.iterdir())                 # the user's home is untouched


def test_sigterm_drains_a_stream_in_flight_then_exits_0(home, proxy):
    gateway = proxy()
    payload = json.dumps({"model": "m", "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-sim-delay-ms: 150\r\n"
                 b"x-sim-events: 8\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
    received = b""
    while b"message_start" not in received:
        received += sock.recv(65536)
    gateway.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):                    # no longer accepting
        socket.create_connection(("127.0.0.1", gateway.port), timeout=2).close()
    while not received.endswith(b"0\r\n\r\n"):
        piece = sock.recv(65536)
        assert piece, "the stream was cut instead of drained"
        received += piece
    sock.close()
    assert received.count(b"event: content_block_delta") == 8 and b"message_stop" in received
    assert gateway.proc.wait(timeout=15) == 0
