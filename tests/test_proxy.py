"""dario_lib/proxy.py and the proxy settings: which proxy, the CONNECT tunnel, TLS trust.

The tunnel is tested through a real proxy, Debian's tinyproxy (tests/proxy_kit.py), to a
real TLS upstream signed by a throwaway CA (tests/tls_kit.py) in front of the simulator;
strictness about the proxy's answer is tested against scripted listeners. The end-to-end
tests run `python dario.py proxy` as a child process with HTTPS_PROXY or upstream.proxy.
"""

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import traceback
from urllib.parse import urlsplit

import pytest
import requests

from dario_lib import config, proxy
from dario_lib.simulator import Simulator

from .helpers import make_settings, wait_until
from .proxy_kit import SKIP_REASON, Tinyproxy, free_port, tinyproxy_missing
from .tls_kit import TestCA, TlsFront, close_listener, openssl_missing

SECRET = "pr0xy-S3cret-9f1c"
USER = "dario-user"
MESSAGE = {"model": "claude-opus-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
CLEAN_ENV = {"HTTPS_PROXY": "", "https_proxy": "", "NO_PROXY": "", "no_proxy": ""}



# -- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca():
    if openssl_missing():
        pytest.skip("the openssl command is not installed")
    test_ca = TestCA()
    yield test_ca
    test_ca.cleanup()


@pytest.fixture(scope="module")
def upstream_sim():
    simulator = Simulator().start()
    yield simulator
    simulator.stop()


@pytest.fixture(scope="module")
def front(ca, upstream_sim):
    """TLS (signed by the test CA) on a free port, in front of the simulator."""
    tls_front = TlsFront(ca, ("127.0.0.1", upstream_sim.port))
    yield tls_front
    tls_front.stop()


@pytest.fixture
def tinyproxy(front):
    if tinyproxy_missing():
        pytest.skip(SKIP_REASON)
    with Tinyproxy([front.port]) as running:
        yield running


@pytest.fixture
def tinyproxy_auth(front):
    if tinyproxy_missing():
        pytest.skip(SKIP_REASON)
    with Tinyproxy([front.port], auth=(USER, SECRET)) as running:
        yield running


class ScriptedProxy:
    """One connection: records the request head, then `script(conn, done)` answers it; the
    connection stays open until close()."""

    def __init__(self, script):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.head = b""
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(script,), name=f"scripted-proxy-{self.port}")
        self.thread.start()

    def _run(self, script):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                while b"\r\n\r\n" not in self.head:
                    piece = conn.recv(4096)
                    if not piece:
                        return
                    self.head += piece
                script(conn, self.done)
                self.done.wait(5)
            except OSError:             # dial() gave up and closed: that is the point
                pass

    def close(self):
        self.done.set()
        close_listener(self.listener)
        self.thread.join(5)


@pytest.fixture
def scripted():
    made = []

    def start(script):
        made.append(ScriptedProxy(script))
        return made[-1]

    yield start
    for fake in made:
        fake.close()


def texts_of(err):
    """Every text an exception could show: str, repr, args and a formatted traceback."""
    return [str(err), repr(err), repr(err.args), "".join(traceback.format_exception(err))]


def tunnel_get(sock, ca, path="/v1/models"):
    """TLS over a tunnelled socket, verified against the test CA; one GET; the raw answer."""
    tls = proxy.tls_context(ca.ca_file).wrap_socket(sock, server_hostname="127.0.0.1")
    with tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while piece := tls.recv(65536):
            data += piece
    return data


# -- choose(): which proxy -----------------------------------------------------------

def test_an_http_upstream_is_never_proxied():
    env = {"HTTPS_PROXY": "http://proxy.corp:3128"}
    assert proxy.choose("http://127.0.0.1:9000", None, env) is None
    assert proxy.choose("http://localhost:9000", "http://proxy.corp:3128", env) is None


def test_https_proxy_comes_from_the_environment():
    chosen = proxy.choose("https://api.anthropic.com", None, {"HTTPS_PROXY": "http://proxy.corp:3128"})
    assert (chosen.host, chosen.port, chosen.source) == ("proxy.corp", 3128, "HTTPS_PROXY")
    assert proxy.choose("https://api.anthropic.com", None, {}) is None
    others = {"HTTP_PROXY": "http://p:1", "ALL_PROXY": "http://p:1"}       # not read for an https upstream
    assert proxy.choose("https://api.anthropic.com", None, others) is None


def test_lowercase_https_proxy_wins_even_when_empty():
    both = {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"}
    assert proxy.choose("https://api.anthropic.com", None, both).host == "lower"
    assert proxy.choose("https://api.anthropic.com", None, dict(both, https_proxy="")) is None
    assert proxy.choose("https://api.anthropic.com", None,
                        {"HTTPS_PROXY": "http://p:1", "no_proxy": "", "NO_PROXY": "*"}).host == "p"


@pytest.mark.parametrize("upstream, no_proxy, bypassed", [
    ("https://api.example.com", "", False),
    ("https://api.example.com", "*", True),
    ("https://api.example.com", " * ", True),
    ("https://api.example.com", "example.com", True),
    ("https://api.example.com", ".example.com", True),
    ("https://api.example.com", "api.example.com", True),
    ("https://api.example.com", "EXAMPLE.com", True),
    ("https://example.com", ".example.com", True),
    ("https://api.example.com", "ample.com", False),          # suffixes end at a dot
    ("https://api.example.com", "other.org, example.com ,", True),
    ("https://api.example.com", "localhost,127.0.0.1,,", False),
    ("https://api.example.com", "api.example.com:443", True),
    ("https://api.example.com", "api.example.com:8443", False),
    ("https://api.example.com:8443", "example.com:8443", True),
    ("https://127.0.0.1:8443", "127.0.0.1", True),
    ("https://127.0.0.1:8443", "127.0.0.0/8", True),
    ("https://127.0.0.1:8443", "10.0.0.0/8", False),
    ("https://127.0.0.1:8443", "127.0.0.1:8443", True),
    ("https://127.0.0.1:8443", "127.0.0.1:9999", False),
    ("https://127.0.0.1:8443", "localhost", False),           # no name resolution, as requests
    ("https://10.1.2.3", "10.1.2.3/32, 192.168.0.0/16", True),
    ("https://[::1]:8443", "::1", True),
    ("https://[::1]:8443", "[::1]", True),
    ("https://[::1]:8443", "::1/128", True),
    ("https://[::1]:8443", "fe80::/10", False),
    ("https://[::1]:8443", "[::1]:8443", True),
])
def test_no_proxy_forms(upstream, no_proxy, bypassed):
    chosen = proxy.choose(upstream, None, {"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": no_proxy})
    assert (chosen is None) is bypassed
    parts = urlsplit(upstream)
    assert proxy.bypassed(parts.hostname, parts.port or 443, no_proxy) is bypassed


def test_the_configured_proxy_overrides_the_environment_and_no_proxy():
    env = {"HTTPS_PROXY": "http://env-proxy:1", "NO_PROXY": "*"}
    chosen = proxy.choose("https://api.anthropic.com", "http://configured:3128", env)
    assert (chosen.host, chosen.port, chosen.source) == ("configured", 3128, "upstream.proxy")


@pytest.mark.parametrize("configured", ["direct", "none", "", " DIRECT "])
def test_direct_means_no_proxy_even_with_https_proxy_set(configured):
    assert proxy.choose("https://api.anthropic.com", configured, {"HTTPS_PROXY": "http://p:1"}) is None


@pytest.mark.parametrize("text, host, port, user, password", [
    ("http://proxy.corp:3128", "proxy.corp", 3128, None, None),
    ("HTTP://Proxy.Corp:3128/", "proxy.corp", 3128, None, None),
    ("proxy.corp:3128", "proxy.corp", 3128, None, None),          # no scheme: http, as requests
    ("http://proxy.corp", "proxy.corp", 80, None, None),
    ("http://10.0.0.1:8080", "10.0.0.1", 8080, None, None),
    ("http://[fd00::1]:8080", "fd00::1", 8080, None, None),
    ("http://us%40er:p%3As%40ss@proxy:1", "proxy", 1, "us@er", "p:s@ss"),
    ("http://user@proxy:1", "proxy", 1, "user", None),
])
def test_proxy_url_forms(text, host, port, user, password):
    parsed = proxy.parse_url(text)
    assert (parsed.host, parsed.port, parsed.username, parsed.password) == (host, port, user, password)


@pytest.mark.parametrize("text", [
    f"https://{USER}:{SECRET}@proxy:443", f"socks5://{USER}:{SECRET}@proxy:1080",
    f"http://{USER}:{SECRET}@proxy:99999", f"http://{USER}:{SECRET}@proxy:port",
    f"http://{USER}:{SECRET}@proxy:0", f"http://{USER}:{SECRET}@proxy:1/path",
    f"http://{USER}:{SECRET}@:1", f"http://{USER}:{SECRET}@proxy:1?q=1",
    f"http://{USER}:{SECRET}@pro xy:1", f"http://{USER}:{SECRET}@a\r\nb:1", f"http://{USER}:{SECRET}@proxy/:1",
])
def test_a_bad_proxy_url_is_refused_without_quoting_it(text):
    with pytest.raises(ValueError) as caught:
        proxy.parse_url(text)
    assert "http://" in str(caught.value)
    for shown in texts_of(caught.value):
        assert SECRET not in shown and USER not in shown


def test_https_proxies_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="https:// proxies are not supported"):
        proxy.parse_url("https://proxy:443")


def test_a_bad_https_proxy_variable_names_the_variable_not_the_value():
    with pytest.raises(ValueError) as caught:
        proxy.choose("https://api.anthropic.com", None, {"https_proxy": f"socks5://{USER}:{SECRET}@p:1"})
    assert "https_proxy" in str(caught.value)
    assert all(SECRET not in shown for shown in texts_of(caught.value))


def test_public_and_repr_hold_no_credentials():
    parsed = proxy.parse_url(f"http://{USER}:{SECRET}@[fd00::1]:3128")
    assert parsed.public() == "http://[fd00::1]:3128"
    assert SECRET not in repr(parsed) and USER not in repr(parsed)
    assert proxy.mask(f"http://{USER}:{SECRET}@proxy:3128") == "http://***:***@proxy:3128"
    assert proxy.mask("http://proxy:3128") == "http://proxy:3128"
    assert parsed.authorization() == "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
    assert proxy.parse_url("http://proxy:1").authorization() is None


# -- settings ---------------------------------------------------------------------------

def test_settings_take_the_proxy_from_flag_env_and_file(home):
    (home / "config.json").write_text(json.dumps(
        {"upstream": {"proxy": "http://file-proxy:1", "caFile": "/etc/corp/ca.pem"}}))
    from_file = make_settings(home)
    assert from_file.upstream_proxy == "http://file-proxy:1" and from_file.sources["upstream.proxy"] == "file"
    assert from_file.upstream_ca_file == "/etc/corp/ca.pem"
    from_env = make_settings(home, env={"DARIO_UPSTREAM_PROXY": "http://env-proxy:2"})
    assert from_env.upstream_proxy == "http://env-proxy:2" and from_env.sources["upstream.proxy"] == "env"
    from_flag = make_settings(home, flags={"upstream.proxy": "none"},
                              env={"DARIO_UPSTREAM_PROXY": "http://env-proxy:2"})
    assert from_flag.upstream_proxy == "direct" and from_flag.sources["upstream.proxy"] == "flag"
    assert make_settings(home, flags={"upstream.proxy": ""}).upstream_proxy == "direct"
    assert config.parse_value("upstream.proxy", "null") is None
    assert config.parse_value("upstream.caFile", "") is None


def test_settings_never_show_proxy_credentials(home):
    settings = make_settings(home, flags={"upstream.proxy": f"http://{USER}:{SECRET}@proxy:3128"})
    assert settings.upstream_proxy == f"http://{USER}:{SECRET}@proxy:3128"
    assert SECRET not in repr(settings)
    assert config.public_value("upstream.proxy", settings.upstream_proxy) == "http://***:***@proxy:3128"
    assert config.public_value("upstream.proxy", None) is None
    assert config.public_value("port", 3456) == 3456


def test_a_bad_proxy_setting_is_never_quoted(home):
    bad = f"https://{USER}:{SECRET}@proxy:443"
    errors = []
    for flags, env in (({"upstream.proxy": bad}, {}), ({}, {"DARIO_UPSTREAM_PROXY": bad})):
        with pytest.raises(config.ConfigError) as caught:
            make_settings(home, flags=flags, env=env)
        errors.append(str(caught.value))
    with pytest.raises(config.ConfigError) as caught:
        config.parse_value("upstream.proxy", bad)
    errors.append(str(caught.value))
    (home / "config.json").write_text(json.dumps({"upstream": {"proxy": bad}}))
    settings = make_settings(home)
    assert settings.upstream_proxy is None
    errors.extend(settings.warnings)
    assert "--upstream-proxy" in errors[0] and "DARIO_UPSTREAM_PROXY" in errors[1]
    assert "upstream.proxy" in errors[2] and "upstream.proxy" in errors[3]
    for text in errors:
        assert SECRET not in text and USER not in text, text
        assert "http://" in text                       # says what is allowed


# -- tls_context() ----------------------------------------------------------------------

def test_tls_context_trusts_requests_bundle_or_the_ca_file_alone(ca, tmp_path):
    assert proxy.tls_context().cert_store_stats()["x509_ca"] > 10
    assert proxy.tls_context(ca.ca_file).cert_store_stats()["x509_ca"] == 1
    with pytest.raises(ValueError, match="upstream.caFile .*missing.pem"):
        proxy.tls_context(str(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ValueError, match="upstream.caFile .*junk.pem"):
        proxy.tls_context(str(tmp_path / "junk.pem"))


# -- dial(): the tunnel through tinyproxy -------------------------------------------------

def test_dial_tunnels_through_tinyproxy_to_the_tls_upstream(tinyproxy, front, ca):
    sock = proxy.dial(proxy.parse_url(tinyproxy.url), "127.0.0.1", front.port, timeout=5)
    answer = tunnel_get(sock, ca)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b'"data"' in answer                                 # the simulator's model list
    assert wait_until(lambda: f"CONNECT 127.0.0.1:{front.port} HTTP/1.1" in tinyproxy.log)


def test_dial_sends_the_credentials_the_proxy_asks_for(tinyproxy_auth, front, ca):
    url = f"http://{USER}:{SECRET}@127.0.0.1:{tinyproxy_auth.port}"
    sock = proxy.dial(proxy.parse_url(url), "127.0.0.1", front.port, timeout=5)
    assert tunnel_get(sock, ca).startswith(b"HTTP/1.1 200 ")


def test_wrong_or_missing_credentials_are_a_proxy_error_without_the_password(tinyproxy_auth, front):
    wrong = proxy.parse_url(f"http://{USER}:{SECRET}-wrong@127.0.0.1:{tinyproxy_auth.port}")
    with pytest.raises(proxy.ProxyError) as caught:
        proxy.dial(wrong, "127.0.0.1", front.port, timeout=5)
    err = caught.value
    assert err.status == 502 and err.kind == "api_error" and err.proxy_status in (401, 407)
    assert "did not accept dario's credentials" in err.reason
    for shown in texts_of(err):
        assert SECRET not in shown and USER not in shown
    with pytest.raises(proxy.ProxyError) as caught:
        proxy.dial(proxy.parse_url(tinyproxy_auth.url), "127.0.0.1", front.port, timeout=5)
    assert caught.value.status == 502 and caught.value.proxy_status == 407
    assert caught.value.reason == "the proxy wants credentials (407)"


def test_a_tunnel_the_proxy_refuses_is_a_proxy_error(tinyproxy):
    with pytest.raises(proxy.ProxyError) as caught:
        proxy.dial(proxy.parse_url(tinyproxy.url), "127.0.0.1", free_port(), timeout=5)   # not a ConnectPort
    assert caught.value.status == 502 and caught.value.reason == "the proxy refused the tunnel (HTTP 403)"


def test_a_proxy_that_is_down_is_a_502():
    with pytest.raises(proxy.ProxyError) as caught:
        down = proxy.parse_url(f"http://{USER}:{SECRET}@127.0.0.1:{free_port()}")
        proxy.dial(down, "127.0.0.1", 443, timeout=5)
    assert (caught.value.status, caught.value.reason) == (502, "proxy unreachable: connection refused")
    assert all(SECRET not in shown for shown in texts_of(caught.value))


# -- dial(): strict about the proxy's answer ---------------------------------------------

def test_the_connect_request_is_exact(scripted):
    fake = scripted(lambda conn, done: conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n"))
    url = f"http://us%40er:p%3As@127.0.0.1:{fake.port}"
    sock = proxy.dial(proxy.parse_url(url), "::1", 8443, timeout=5)
    sock.close()
    auth = base64.b64encode(b"us@er:p:s").decode()
    assert fake.head == (b"CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n"
                         b"Proxy-Authorization: Basic " + auth.encode() + b"\r\n\r\n")


def test_dial_returns_the_socket_with_nothing_read_past_the_answer(scripted):
    def script(conn, done):
        conn.sendall(b"HTTP/1.0 200 OK\r\nVia: corp\r\n\r\n")
        done.wait(0.2)
        conn.sendall(b"from the upstream")
    fake = scripted(script)
    sock = proxy.dial(proxy.parse_url(f"http://127.0.0.1:{fake.port}"), "example.com", 443, timeout=5)
    with sock:
        assert sock.gettimeout() == 5
        assert sock.recv(100) == b"from the upstream"


@pytest.mark.parametrize("answer, reason", [
    (b"SSH-2.0-OpenSSH\r\n\r\n", "the proxy sent a malformed answer"),
    (b"HTTP/1.1 200\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n", "the proxy sent an oversized answer"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n", "the proxy sent a malformed answer"),
    (b"HTTP/1.1 200 OK\r\n\r\nearly bytes", "the proxy sent data before the tunnel was used"),
    (b"HTTP/1.1 200 OK\r\n", "the proxy closed the connection without answering"),
    (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nbad", "the proxy refused the tunnel (HTTP 502)"),
])
def test_a_broken_answer_is_a_502(scripted, answer, reason):
    def script(conn, done):
        conn.sendall(answer)
        if reason.startswith("the proxy closed"):
            conn.shutdown(socket.SHUT_WR)
    fake = scripted(script)
    with pytest.raises(proxy.ProxyError) as caught:
        proxy.dial(proxy.parse_url(f"http://127.0.0.1:{fake.port}"), "example.com", 443, timeout=5)
    assert (caught.value.status, caught.value.reason) == (502, reason)


def test_a_silent_proxy_is_a_504(scripted):
    fake = scripted(lambda conn, done: None)
    with pytest.raises(proxy.ProxyError) as caught:
        proxy.dial(proxy.parse_url(f"http://127.0.0.1:{fake.port}"), "example.com", 443, timeout=0.3)
    assert (caught.value.status, caught.value.kind) == (504, "timeout_error")


def test_a_proxy_that_drips_its_answer_is_held_to_one_deadline(scripted):
    def script(conn, done):
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        while not done.wait(0.05):
            conn.sendall(b"X: y\r\n")   # each line well inside the timeout; the whole is not
    fake = scripted(script)
    with pytest.raises(proxy.ProxyError) as caught:
        proxy.dial(proxy.parse_url(f"http://127.0.0.1:{fake.port}"), "example.com", 443, timeout=0.4)
    assert caught.value.status == 504


def test_dial_refuses_a_host_that_would_forge_lines():
    with pytest.raises(ValueError):
        proxy.dial(proxy.parse_url("http://127.0.0.1:1"), "example.com\r\nX-Evil: 1", 443, timeout=1)


# -- end to end: a gateway reaching its TLS upstream through tinyproxy ---------------------
# These need upstream.py to dial through proxy.choose()/proxy.dial() with
# proxy.tls_context(settings.upstream_ca_file), and /status to show the proxy.

def _gateway(home, front, ca, env, file_settings=None):
    from .test_cli import Gateway
    upstream = {"caFile": ca.ca_file, **(file_settings or {})}
    (home / "config.json").write_text(json.dumps({"upstream": upstream}))
    return Gateway(home, [f"--upstream={front.url}", "-v"], env=dict(CLEAN_ENV, **env))


def _exchange(gateway):
    """A POST /v1/messages and a GET /status, then the gateway stops: (status, body, /status text)."""
    try:
        post = requests.post(gateway.url + "/v1/messages", json=MESSAGE, headers={"x-api-key": "k"},
                             timeout=30)
        status = requests.get(gateway.url + "/status", timeout=10)
        return post.status_code, post.text, status.text
    finally:
        gateway.stop()


def test_gateway_uses_https_proxy_from_the_environment(home, front, ca, tinyproxy_auth):
    url = f"http://{USER}:{SECRET}@127.0.0.1:{tinyproxy_auth.port}"
    env = {"HTTPS_PROXY": url, "https_proxy": url}
    gateway = _gateway(home, front, ca, env)
    code, body, status = _exchange(gateway)
    assert code == 200, body
    assert wait_until(lambda: f"CONNECT 127.0.0.1:{front.port} HTTP/1.1" in tinyproxy_auth.log)
    assert f"http://127.0.0.1:{tinyproxy_auth.port}" in status
    for text in (status, body, gateway.log):
        assert SECRET not in text and USER not in text


def test_gateway_upstream_proxy_setting_overrides_a_bogus_https_proxy(home, front, ca, tinyproxy):
    bogus = f"http://127.0.0.1:{free_port()}"
    gateway = _gateway(home, front, ca, {"HTTPS_PROXY": bogus, "https_proxy": bogus},
                       {"proxy": tinyproxy.url})
    code, body, status = _exchange(gateway)
    assert code == 200, body
    assert wait_until(lambda: f"CONNECT 127.0.0.1:{front.port} HTTP/1.1" in tinyproxy.log)
    assert tinyproxy.url in status


@pytest.mark.parametrize("how", ["NO_PROXY", "direct"])
def test_gateway_goes_direct_when_no_proxy_or_direct_says_so(home, front, ca, how):
    bogus = f"http://127.0.0.1:{free_port()}"
    env = {"HTTPS_PROXY": bogus, "https_proxy": bogus}
    if how == "NO_PROXY":
        env.update(NO_PROXY="localhost,127.0.0.0/8", no_proxy="localhost,127.0.0.0/8")
    gateway = _gateway(home, front, ca, env, {"proxy": "direct"} if how == "direct" else None)
    handshakes = front.handshakes
    code, body, _status = _exchange(gateway)
    assert code == 200, body
    assert front.handshakes > handshakes


def test_an_unusable_ca_file_stops_start_up_with_exit_2(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.json").write_text(json.dumps({"upstream": {"caFile": str(tmp_path / "missing.pem")}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARIO_") and "proxy" not in k.lower()}
    env["DARIO_HOME"] = str(home)
    done = subprocess.run([sys.executable, "dario.py", "proxy", "--port=0", "--upstream=https://127.0.0.1:9"],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "caFile" in done.stderr and "Traceback" not in done.stderr
