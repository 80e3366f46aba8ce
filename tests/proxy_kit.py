"""Test kit: Debian's tinyproxy as a real HTTP CONNECT proxy on a free loopback port.

`Tinyproxy(connect_ports, auth=None)` writes a temporary config (Listen and Allow
127.0.0.1, CONNECT only to `connect_ports`, an optional BasicAuth user and password, a
log file), runs `/usr/bin/tinyproxy -d -c CONF` in the foreground as a child process,
waits until it accepts, and `stop()` ends that one process (by its own handle) and
removes the directory. Tests skip with `SKIP_REASON` when tinyproxy is not installed.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

TINYPROXY = "/usr/bin/tinyproxy"
SKIP_REASON = "tinyproxy is not installed (Debian: apt-get install tinyproxy; .ci/run installs it)"


def tinyproxy_missing():
    return not os.access(TINYPROXY, os.X_OK)


def free_port():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


class Tinyproxy:
    def __init__(self, connect_ports, auth=None, attempts=5):
        self.dir = tempfile.mkdtemp(prefix="dario-tinyproxy-")
        self.log_file = os.path.join(self.dir, "tinyproxy.log")
        self.proc = None
        try:
            for _ in range(attempts):       # the free port can be taken before tinyproxy binds it
                self.port = free_port()
                self._write_config(connect_ports, auth)
                if self._start():
                    break
            else:
                raise RuntimeError("tinyproxy did not start:\n" + self.log)
        except BaseException:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{self.port}"

    def _write_config(self, connect_ports, auth):
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 30", f'LogFile "{self.log_file}"',
                 "LogLevel Info", "MaxClients 64", "Allow 127.0.0.1", "DisableViaHeader Yes"]
        lines += [f"ConnectPort {port}" for port in connect_ports]
        if auth:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        self.conf = os.path.join(self.dir, "tinyproxy.conf")
        with open(self.conf, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")

    def _start(self):
        self.proc = subprocess.Popen([TINYPROXY, "-d", "-c", self.conf], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False            # could not bind (or a bad config): try another port
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.02)        # polling a child's start-up, not a cooldown
        self._end()
        return False

    @property
    def log(self):
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def _end(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self):
        self._end()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
