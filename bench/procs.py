"""The processes under test: the simulator, the dario gateway and nginx, each its own child.

Every child is started through a `Children` registry, which is a context manager: on exit
(normal, exception or Ctrl-C) it terminates each child it started, by pid, waits, and kills
what did not stop in time. Only a SIGKILL of the benchmark itself can leave one behind.

Also here: memory and CPU readings from /proc (`rss_mb`, `cpu_seconds`), a free-port
picker, and the install-or-skip logic for nginx.

Used from the benchmark's main thread only, except `Child.log_tail`, which the pipe-drain
thread fills under a lock.
"""

import collections
import os
import queue
import re
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
_SIM_URL = re.compile(r"^SIMULATOR_URL http://127\.0\.0\.1:(\d+)")


class StartError(Exception):
    """A child did not come up."""


class Child:
    """A started process, its port, and the tail of its output (read on a named thread)."""

    def __init__(self, name, popen, port=None):
        self.name = name
        self.popen = popen
        self.port = port
        self._tail = collections.deque(maxlen=200)
        self._lines = queue.Queue()      # every line, for expect()
        self._lock = threading.Lock()
        self._drain = None
        stream = popen.stdout if popen.stdout is not None else popen.stderr
        if stream is not None:
            # Read from the start, so the child never blocks on a full pipe.
            self._drain = threading.Thread(target=self._pump, args=(stream,),
                                           name=f"bench-drain-{name}", daemon=True)
            self._drain.start()

    @property
    def pid(self):
        return self.popen.pid

    def _pump(self, stream):
        for line in iter(stream.readline, ""):
            line = line.rstrip("\n")
            with self._lock:
                self._tail.append(line)
            self._lines.put(line)
        self._lines.put(None)           # EOF

    def expect(self, pattern, timeout):
        """The first output line matching `pattern` (a compiled regex); StartError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise StartError(f"{self.name}: no line matching {pattern.pattern!r} "
                                 f"within {timeout:.0f}s") from None
            if line is None:
                raise StartError(f"{self.name} exited: {' | '.join(self.log_tail()[-5:])}")
            found = pattern.search(line)
            if found:
                return found

    def log_tail(self):
        with self._lock:
            return list(self._tail)

    def stop(self, timeout=5.0):
        """SIGTERM, wait, then SIGKILL; joins the drain thread. Safe to call twice."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        if self._drain is not None:
            self._drain.join(timeout)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


class Children:
    """Starts the children and guarantees they are stopped: `with Children() as kids:`."""

    def __init__(self):
        self._children = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop_all()

    def stop_all(self):
        while self._children:
            self._children.pop().stop()

    def stop(self, child):
        child.stop()
        if child in self._children:
            self._children.remove(child)

    def spawn(self, name, argv, port=None, **popen_kwargs):
        child = Child(name, subprocess.Popen(argv, **popen_kwargs), port)
        self._children.append(child)
        return child

    # -- the three servers -----------------------------------------------------------

    def simulator(self, timeout=10.0):
        """`python -m dario_lib.simulator --port 0`; the port comes from its first line."""
        child = self.spawn("simulator", [sys.executable, "-m", "dario_lib.simulator", "--port", "0"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        child.port = int(child.expect(_SIM_URL, timeout).group(1))
        return child

    def dario(self, upstream_port, home, port=0, timeout=15.0):
        """`python dario.py proxy` with DARIO_HOME=home; returns once it logs its address."""
        child = self.spawn("dario", dario_argv(upstream_port, port), cwd=REPO, env=dario_env(home),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        child.port = int(child.expect(_LISTENING, timeout).group(1))
        return child

    def nginx(self, binary, upstream_port, workdir, timeout=10.0):
        """nginx in the foreground, one process, with a config generated in `workdir`."""
        port = free_port()
        os.makedirs(os.path.join(workdir, "tmp"), exist_ok=True)
        conf = os.path.join(workdir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(nginx_config(workdir, port, upstream_port))
        argv = [binary, "-p", workdir, "-c", conf, "-e", os.path.join(workdir, "error.log")]
        child = self.spawn("nginx", argv, port=port, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        wait_for_port(port, timeout, child)
        return child


def dario_argv(upstream_port, port=0):
    return [sys.executable, "dario.py", "proxy", f"--port={port}",
            f"--upstream=http://127.0.0.1:{upstream_port}", "--no-overage-notify"]


def dario_env(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARIO_")}
    env["DARIO_HOME"] = home
    return env


def nginx_config(workdir, port, upstream_port):
    """One process (master_process off), no daemon, everything under workdir, streaming proxy."""
    tmp = os.path.join(workdir, "tmp")
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 64m;
    keepalive_requests 1000000;
    upstream sim {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def find_or_install_nginx(allow_install=True, timeout=180):
    """(path or None, message). Tries apt-get (nginx-light, then nginx) when allowed."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found:
        return found, f"nginx found at {found}"
    if not allow_install:
        return None, "nginx not installed (install skipped)"
    apt = shutil.which("apt-get")
    if apt is None:
        return None, "nginx not installed and apt-get is not available"
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None:
        return None, "nginx not installed; not root and no sudo"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for package in ("nginx-light", "nginx"):
        try:
            done = subprocess.run(prefix + [apt, "install", "-y", "-q", package], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"installing {package} timed out after {timeout}s"
        found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if done.returncode == 0 and found:
            return found, f"nginx installed from the Debian package {package}"
    return None, f"nginx could not be installed: {done.stderr.strip().splitlines()[-1:]}"


def nginx_version(binary):
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    return (done.stderr or done.stdout).strip()


# -- readings -----------------------------------------------------------------------

def rss_mb(pid):
    """Resident set size of a process in MB (VmRSS), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid):
    """User + system CPU seconds a process has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_count(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid):
    """Open file descriptors of a process (sockets included), or None if it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cpu_snapshot():
    """(all CPUs' time, their busy time, this process's + its reaped children's) in seconds.

    Two snapshots tell how much of the machine other processes used in between: the
    busy time that was not ours (children count once they have been waited for).
    """
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    return sum(values) / hz, (sum(values) - values[3] - values[4]) / hz, ours


def others_busy_pct(before, after):
    """% of all CPUs that other processes used between two `cpu_snapshot()`s."""
    total, busy, ours = (b - a for a, b in zip(before, after))
    return max(0.0, 100.0 * (busy - ours) / max(total, 1e-9))


def machine_busy_pct(seconds=1.0):
    """How busy all CPUs were over `seconds` (from /proc/stat): others' load, if idle here."""
    def snapshot():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]      # total, idle + iowait
    total0, idle0 = snapshot()
    time.sleep(seconds)
    total1, idle1 = snapshot()
    return 100.0 * (1 - (idle1 - idle0) / max(1, total1 - total0))


def free_port():
    """A port that was free a moment ago (bound to port 0 and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, timeout, child=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.popen.poll() is not None:
            raise StartError(f"{child.name} exited: {' | '.join(child.log_tail()[-5:])}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.01)
    raise StartError(f"nothing listens on port {port} after {timeout}s")
