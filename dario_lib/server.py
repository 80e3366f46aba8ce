"""The gateway server: builds the shared parts once and serves each connection on a thread.

`GatewayServer` is a `ThreadingHTTPServer` that owns the one upstream session, guard,
event bus, record store and watchdog; handlers reach them through `self.server`.
Tests build as many servers as they like (port 0, injected clock and timer).

It also bounds the gateway:
- past `max_connections` open connections a new one gets an immediate 503
  `overloaded_error` instead of a thread; the accept loop never waits on that client
  (its socket is handed to the `Lingerer`). The cap stays below the process's
  descriptor limit with headroom for the upstream pool, lingering closes, the state
  file, the ledger and notifications, and `run()` raises the soft limit to the hard one
  first. Should `accept()` still hit EMFILE, one spare descriptor is given up to take
  the waiting client, answer it 503 and close it, so the accept loop never spins;
- request heads and bodies held in memory are bounded in total (`heads`, `bodies`);
- `drain()` stops accepting, closes `/analytics/stream` subscribers at once and gives
  forwarded requests in flight up to ten seconds to finish.

The guard and the budgets live in `$DARIO_HOME` (guard-state.json, the spend ledger)
unless `store.url` names a Redis store a team of gateways shares (`team.TeamGuard`,
`team_budgets.TeamBudgets`); `self.team` is that store, or None.

`run()` is the `proxy` command: bind, announce, serve until SIGINT/SIGTERM, drain.
"""

import dataclasses
import errno
import logging
import os
import signal
import socket
import socketserver
import threading
import time
from http.server import ThreadingHTTPServer

from . import __version__, guardtext, proxy
from .alerts import Alerts
from .budgets import Budgets, Ledger
from .config import STORE_FIELDS
from .events import EventBus
from .guard import Guard
from .handler import Handler
from .limits import MAX_CONNECTIONS, UPSTREAM_POOL, Allowance, connection_cap, fd_limit, raise_fd_limit
from .linger import Lingerer
from .notify import Notifier, secrets_of
from .records import RecordStore
from .redis_store import MissingDependency, open_store
from .reply import prebuilt
from .statefile import StateFile
from .team import TeamGuard
from .team_budgets import TeamBudgets
from .upstream import Upstream
from .watchdog import Watchdog

log = logging.getLogger(__name__)

DRAIN_S = 10
_OVERLOADED_RESPONSE = prebuilt(503, "overloaded_error", "dario is at its connection limit; retry shortly",
                                [("Retry-After", "1")])


class Tracker:
    """Counts forwarded requests in flight, so a drain can wait for them."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())   # a plain lock: cheaper than an RLock
        self.count = 0

    def __enter__(self):
        with self._cond:
            self.count += 1

    def __exit__(self, *exc):
        with self._cond:
            self.count -= 1
            if self.count == 0:
                self._cond.notify_all()

    def wait_idle(self, timeout):
        with self._cond:
            return self._cond.wait_for(lambda: self.count == 0, timeout)


class GatewayServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024          # the stdlib's 5 resets connections under a burst
    block_on_close = False

    def __init__(self, settings, *, clock=time.time, timer_factory=threading.Timer,
                 notifier=None, heartbeat_s=25.0, max_connections=None, bus=None):
        # Before binding: without the redis package this raises MissingDependency.
        self.team = open_store(settings.store, marker_path=os.path.join(settings.home, "store-marker.json"))
        self.address_family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        super().__init__((settings.host, settings.port), Handler)
        self.settings = settings
        self.clock = clock
        self.heartbeat_s = heartbeat_s
        self.max_connections = max_connections or connection_cap(fd_limit())
        self.heads = Allowance(settings.max_head_bytes_in_flight)
        self.bodies = Allowance(settings.max_body_bytes_in_flight)
        self.lingerer = Lingerer()
        self._spare = _spare_fd()
        self.bus = bus if bus is not None else EventBus()
        self.store = RecordStore(settings.max_records, self.bus, settings.log_file)
        self.upstream = _upstream(settings)
        secrets = secrets_of(settings)          # kept out of every child process's environment
        self.notifier = notifier if notifier is not None else Notifier(settings.guard.notify_os, secrets=secrets)
        self.alerts = Alerts(settings.notify_command, settings.notify_webhook,
                             origin=f"dario@{socket.gethostname()}:{self.server_address[1]}", secrets=secrets)
        shared = dict(bus=self.bus, notifier=self.notifier, alerts=self.alerts, clock=clock,
                      timer_factory=timer_factory, resume_command=guardtext.resume_command(self.server_address[1]))
        if self.team is None:
            self.guard = Guard(settings.guard, state_file=StateFile(os.path.join(settings.home, "guard-state.json")),
                               **shared)
        else:
            self.guard = TeamGuard(settings.guard, self.team, fail_open=settings.store.fail_open, **shared)
        self.budgets = self._budgets(settings)
        self.watchdog = Watchdog().start()
        self.tracker = Tracker()
        self.account_aliases = {digest: alias for alias, digest in settings.accounts.items()}
        self.started_at = time.monotonic()
        self.resolver = None            # () -> Settings, for reload(); set by run()
        self.draining = False
        self._connections = 0
        self._conn_lock = threading.Lock()
        self._serve_thread = None

    def _budgets(self, settings):
        if self.team is not None:
            return TeamBudgets(settings.guard.budgets, self.team, self.guard)
        ledger = Ledger(os.path.join(settings.home, "spend-ledger.jsonl"))
        return Budgets(settings.guard.budgets, ledger, self.guard, self.clock)

    def server_bind(self):
        # HTTPServer.server_bind would call socket.getfqdn(), a DNS lookup at start.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def port(self):
        return self.server_address[1]

    @property
    def url(self):
        host = self.settings.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    # -- connections -------------------------------------------------------------

    def get_request(self):
        try:
            return super().get_request()
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE):
                self._shed_one()
            raise

    def _shed_one(self):
        """At the descriptor limit: give up the spare descriptor to take the waiting client,
        answer it 503 and close it, then take the spare back. Without this the listening
        socket stays readable and the accept loop spins a core."""
        if self._spare is None:
            time.sleep(0.05)
            self._spare = _spare_fd()
            return
        os.close(self._spare)
        self._spare = None
        try:
            sock, _ = self.socket.accept()
        except OSError:
            sock = None
        if sock is not None:
            _refuse(sock)
            sock.close()
        self._spare = _spare_fd()

    def process_request(self, request, client_address):
        with self._conn_lock:
            full = self._connections >= self.max_connections
            if not full:
                self._connections += 1
        if full:
            _refuse(request)
            self.lingerer.add(request)      # never wait on this client here
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError:            # no thread could be started
            self._release()
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self):
        with self._conn_lock:
            self._connections -= 1

    def shutdown_request(self, request):
        """Close a client connection without losing the last answer to a TCP reset
        (see `linger`), on the lingerer's thread."""
        self.lingerer.add(request)

    def handle_error(self, request, client_address):
        log.debug("error on a connection from %s", client_address[0], exc_info=True)

    @property
    def connections(self):
        with self._conn_lock:
            return self._connections

    # -- life cycle --------------------------------------------------------------

    def start(self, poll_interval=0.5):
        """Load the saved guard state and serve on a background thread.

        `poll_interval` bounds how long `drain()` waits for the accept loop to notice.
        """
        self.guard.start()
        self.budgets.start()
        self._serve_thread = threading.Thread(target=self.serve_forever, args=(poll_interval,),
                                              name="dario-accept", daemon=True)
        self._serve_thread.start()
        return self

    def drain(self, timeout=DRAIN_S):
        """Stop accepting, end event streams, let forwarded requests finish; then clean up."""
        self.draining = True
        if self._serve_thread is not None:
            self.shutdown()             # blocks forever unless serve_forever is running
            self._serve_thread = None
        self.server_close()
        self.bus.close_all()
        finished = self.tracker.wait_idle(timeout)
        if not finished:
            log.warning("%d request(s) still in flight after %ss; exiting anyway",
                        self.tracker.count, timeout)
        self.guard.close()
        self.alerts.close()
        self.watchdog.stop()
        self.upstream.close()
        self.store.close()
        self.lingerer.stop()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        return finished

    def reload(self):
        """Re-read the configuration as SIGHUP does and apply it. Returns the names that
        need a restart, or raises ConfigError/ValueError (nothing applied) with the reason.
        `resolver()` (set by `run`: the proxy command's flags and environment) resolves
        the settings afresh."""
        from .config import ConfigError
        if self.resolver is None:
            raise ConfigError("this gateway cannot reload its configuration")
        try:
            settings = self.resolver()
            for warning in settings.warnings:
                log.warning("%s", warning)
            needs_restart = self.reconfigure(settings)
        except (ConfigError, ValueError) as err:     # ValueError: an unusable proxy variable
            log.error("config not reloaded: %s", err)
            raise
        log.info("config reloaded from %s (%s)%s", settings.config_path, settings.config_source,
                 f"; {', '.join(needs_restart)} change(s) need a restart" if needs_restart else "")
        return needs_restart

    def reconfigure(self, settings):
        """Apply reloaded settings (SIGHUP). Returns the names that need a restart instead.

        Requests in flight keep the objects they started with; new requests see the new
        settings, which are swapped in as one reference.
        """
        old = self.settings
        restart = [name for name, attr in (("host", "host"), ("port", "port"), ("maxRecords", "max_records"))
                   if getattr(old, attr) != getattr(settings, attr)]
        restart += [name for name, attr in STORE_FIELDS.items()
                    if getattr(old.store, attr) != getattr(settings.store, attr)]
        settings = dataclasses.replace(settings, host=old.host, port=old.port, max_records=old.max_records,
                                       store=old.store)
        if _upstream_key(settings) != _upstream_key(old):
            # The old session is left to in-flight requests and the garbage collector.
            self.upstream = _upstream(settings)
        self.heads.limit = settings.max_head_bytes_in_flight
        self.bodies.limit = settings.max_body_bytes_in_flight
        if settings.log_file != old.log_file:
            self.store.set_log_file(settings.log_file)
        self.account_aliases = {digest: alias for alias, digest in settings.accounts.items()}
        if hasattr(self.notifier, "os_notify"):
            self.notifier.os_notify = settings.guard.notify_os
        self.alerts.command = list(settings.notify_command) if settings.notify_command else None
        self.alerts.webhook = settings.notify_webhook
        self.guard.reconfigure(settings.guard)
        if settings.guard.budgets != old.guard.budgets:
            budgets = self._budgets(settings)
            budgets.start()
            self.budgets = budgets
        self.settings = settings
        return restart

    def status(self):
        halts = self.guard.halts()
        halt = halts[0] if halts else None
        summary = self.store.summary()
        settings = self.settings
        return {
            "version": __version__,
            "bind": f"{settings.host}:{self.port}",
            "upstream": settings.upstream,
            "upstreamProxy": self.upstream.proxy.public() if self.upstream.proxy else None,
            "configSource": settings.config_source,
            "configPath": settings.config_path,
            "uptimeS": round(time.monotonic() - self.started_at, 1),
            "auth": "api-key" if settings.api_key else "none",
            "guard": {
                "state": "halted" if halt else "normal",
                "halt": halt.public() if halt else None,
                "config": self.guard.config.public(),
                "halts": [h.public() for h in halts],
                "trips": dict(self.guard.trips),
                "warnings": self.guard.warnings,
                "guards": self.guard.config.guards(),
                "resumeCommand": self.guard.resume_command,
            },
            "budgets": self.budgets.status(),
            "extraUsage": self.guard.extra_usage_status(self.budgets),
            "store": self.guard.status() if self.team is not None else {"kind": "file", "home": settings.home},
            "alerts": {"command": bool(settings.notify_command), "webhook": bool(settings.notify_webhook)},
            "requests": summary["requests"],
            "outcomes": summary["outcomes"],
            "lastClaims": summary["lastClaims"],
            "lastRate": summary["lastRate"],
            "inFlight": self.tracker.count,
            "connections": self.connections,
            "maxConnections": self.max_connections,
            "subscribers": self.bus.count,
        }


def _upstream(settings):
    """The upstream client for these settings (raises ValueError for a bad proxy variable)."""
    return Upstream(settings.upstream, settings.read_timeout_s, pool_size=UPSTREAM_POOL,
                    proxy=proxy.choose(settings.upstream, settings.upstream_proxy),
                    ca_file=settings.upstream_ca_file)


def _upstream_key(settings):
    return (settings.upstream, settings.read_timeout_s, settings.upstream_proxy, settings.upstream_ca_file)


def _spare_fd():
    try:
        return os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def _refuse(sock):
    """The over-cap answer, written without blocking (a client not reading loses it)."""
    try:
        sock.setblocking(False)
        sock.send(_OVERLOADED_RESPONSE)
    except OSError:
        pass


def _another_gateway(host, port):
    """Is the thing listening on host:port a dario gateway? (for the bind error)"""
    import http.client
    try:
        conn = http.client.HTTPConnection(host, port, timeout=1)
        conn.request("GET", "/health", headers={"Host": "127.0.0.1"})
        body = conn.getresponse().read(2048)
        conn.close()
        return b'"status"' in body and b'"guard"' in body
    except (OSError, http.client.HTTPException):
        return False


def sd_notify(message):
    """Tell systemd (Type=notify units) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not hasattr(socket, "AF_UNIX"):
        return
    if address.startswith("@"):
        address = "\0" + address[1:]          # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as err:
        log.debug("sd_notify failed: %s", err)


def run(settings, reload=None):
    """The `proxy` command. Returns the exit status.

    `reload()` returns freshly resolved Settings; it is called on SIGHUP.
    """
    limit = raise_fd_limit()
    try:
        server = GatewayServer(settings)
    except (ValueError, MissingDependency) as err:   # an unusable proxy or CA file; no redis package
        log.error("%s", err)
        return 2
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            who = ("another dario gateway is listening there" if _another_gateway(settings.host, settings.port)
                   else "another program is listening there")
            log.error("cannot listen on %s:%s: the port is in use (%s). Stop it or pick another "
                      "--port.", settings.host, settings.port, who)
        else:
            log.error("cannot listen on %s:%s: %s", settings.host, settings.port, err.strerror or err)
        return 1
    stop, hup = threading.Event(), threading.Event()

    def on_signal(signum, frame):
        stop.set()

    def on_hup(signum, frame):
        hup.set()
        stop.set()                              # wake the main loop

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if reload is not None and hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
    server.resolver = reload
    server.start(poll_interval=0.1)      # shutdown waits at most this long for the accept loop
    guard = settings.guard
    log.info("dario %s listening on %s -> %s (guard: %s%s)", __version__, server.url, settings.upstream,
             "off" if not guard.enabled else guard.behavior,
             "" if not guard.enabled or guard.behavior != "halt" else
             f", cooldown {guard.cooldown_ms // 1000}s" if guard.cooldown_ms else ", manual resume")
    if server.team is not None:
        log.info("team store: %s, namespace %s; this gateway is %s; %s while it is unavailable",
                 server.team.host, server.team.namespace, server.team.gateway_id,
                 "forwarding (failOpen)" if settings.store.fail_open else "503 store_unavailable")
    if settings.api_key:
        log.info("gateway auth is on: clients send x-dario-api-key or Proxy-Authorization")
    if limit is not None and server.max_connections < MAX_CONNECTIONS:
        log.warning("the open-file limit is %d: serving at most %d connections at once "
                    "(raise it, e.g. LimitNOFILE= or ulimit -n, for more)", limit, server.max_connections)
    sd_notify("READY=1")
    while True:
        if not stop.wait(1.0):      # a timeout keeps Ctrl-C responsive on Windows too
            continue
        if not hup.is_set():
            break
        hup.clear()
        stop.clear()
        try:
            server.reload()
        except ValueError:                  # said by reload(); the old settings stay
            pass
    sd_notify("STOPPING=1")
    log.info("shutting down: draining requests in flight (up to %ss)", DRAIN_S)
    server.drain(DRAIN_S)
    log.info("stopped")
    return 0
