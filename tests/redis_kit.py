"""A real redis-server for tests: Debian's binary on a free loopback port, in a temp dir.

No system service and no persistence unless asked (`aof=True`): a restart then comes
back empty, as a Redis without persistence does. `password` sets `requirepass`;
`unix=True` also listens on a socket in a short temp path (sockets have a 108-byte path
limit). Tests that need it skip, with the reason, only when redis-server is missing.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def require_redis_server():
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip("redis-server is not installed (Debian package redis-server)")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    def __init__(self, password=None, aof=False, unix=False):
        self.password, self.aof, self.unix = password, aof, unix
        self.dir = tempfile.mkdtemp(prefix="dario-redis-")
        self.socket_path = os.path.join(self.dir, "redis.sock")
        self.port = _free_port()
        self.process = None

    def url(self, db=0):
        return f"redis://127.0.0.1:{self.port}/{db}"

    def unix_url(self, db=0):
        return f"unix://{self.socket_path}?db={db}"

    def start(self):
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}", "save \"\"",
                 "daemonize no", f"logfile {os.path.join(self.dir, 'redis.log')}",
                 f"appendonly {'yes' if self.aof else 'no'}", "appendfsync always"]
        if self.password:
            lines.append(f"requirepass {self.password}")
        if self.unix:
            lines += [f"unixsocket {self.socket_path}", "unixsocketperm 700"]
        conf = os.path.join(self.dir, "redis.conf")
        with open(conf, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        self.process = subprocess.Popen([REDIS_SERVER, conf], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log()}")
            if self._answers():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}: {self.log()}")

    def _answers(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))     # not -LOADING

    def log(self):
        try:
            with open(os.path.join(self.dir, "redis.log"), errors="replace") as fh:
                return fh.read()[-2000:]
        except OSError:
            return ""

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def restart(self):
        """Stop and start again on the same port: empty unless `aof`."""
        self.stop()
        return self.start()

    def pause(self):
        """SIGSTOP: the port still accepts connections, nothing answers (a hung server)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self):
        self.process.send_signal(signal.SIGCONT)

    def close(self):
        if self.process is not None and self.process.poll() is None:
            self.resume()               # a stopped process does not act on SIGTERM
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_server(**options):
    """Start one; the caller closes it (see the fixtures in test_redis_store.py)."""
    require_redis_server()
    return RedisServer(**options).start()
