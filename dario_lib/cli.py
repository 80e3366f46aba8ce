"""Command line: `python dario.py <command> [flags]`. `main(argv) -> exit status`.

Logging is configured here and nowhere else. Every mistake on the command line is one
line on stderr naming what is wrong plus a hint, and exit status 2.
"""

import argparse
import json
import logging
import os
import sys

from . import __version__, config
from .client import Client, GatewayDown, GatewayError

log = logging.getLogger("dario")

HELP = f"""\
dario {__version__}: a local gateway for the Anthropic API that halts on overage billing.

Usage: python dario.py <command> [flags]      (or `dario <command>` once installed)

Commands:
  (no command)             the TUI, when stdin and stdout are a terminal (this help
                           otherwise): live status, config editor, analytics, hits;
                           [--port=N] picks the gateway
  proxy [flags]            run the gateway in the foreground (logs to stderr)
  resume [--port=N] [--account=LABEL]
                           clear the guard's halt on the running gateway (or only the
                           halt of one account, with overageGuard.scope = account)
  status [--port=N] [--json]
                           guard state, config source, request counts, last claims
  config show              the effective file settings (with defaults) as JSON
  config path              where the config file lives
  config get KEY           one setting, e.g. overageGuard.cooldownMs
  config set KEY VALUE     validate and save one setting (atomic write)
  service print|install|uninstall [--systemd|--launchd]
                           a systemd user unit or launchd agent that runs `proxy`:
                           print it, install it (prints how to enable it), or remove it
  notify-test              send a test event through every configured alert channel
                           (bell, desktop, notifyCommand, notifyWebhook) and report
  demo                     watch the guard trip and clear against a simulated upstream
                           (offline, a few seconds; your own config is untouched)
  help, --help, -h         this text
  --version                the version

Flags for `proxy` (flag > environment > config file > default):
  --port=N                 port to listen on (default 3456; 0 picks a free one)   [DARIO_PORT]
  --host=ADDR              address to bind (default 127.0.0.1)                     [DARIO_HOST]
  --upstream=URL           upstream API (default https://api.anthropic.com;
                           http:// only for loopback hosts)                        [DARIO_UPSTREAM]
  --log-file=PATH          append one JSON line per request record                 [DARIO_LOG_FILE]
  --overage-guard          turn the overage guard on (the default)                 [DARIO_OVERAGE_GUARD=on]
  --no-overage-guard       turn it off: nothing is detected                        [DARIO_OVERAGE_GUARD=off]
  --overage-behavior=halt|warn
                           halt: answer 503 until resumed (default);
                           warn: keep forwarding, only tell                        [DARIO_OVERAGE_BEHAVIOR]
  --overage-cooldown=MS    automatic resume after MS milliseconds
                           (default 1800000 = 30 min; 0 = manual resume only)      [DARIO_OVERAGE_COOLDOWN]
  --overage-notify         desktop notification on halt/warn (the default)         [DARIO_OVERAGE_NOTIFY=on]
  --no-overage-notify      no desktop notification (the terminal bell still rings) [DARIO_OVERAGE_NOTIFY=off]
  -v, --verbose            debug logging                                           [DARIO_VERBOSE]
  --unsafe-no-auth         allow a non-loopback --host without DARIO_API_KEY

Flags for `resume` and `status`:
  --port=N                 the gateway's port (--port > DARIO_PORT > config > 3456)
  --account=LABEL          (resume) clear only this account's halt
  --json                   (status) machine-readable output

Flags for `service`:
  --systemd                a systemd user unit (the default on Linux)
  --launchd                a launchd LaunchAgent plist (the default on macOS)

Environment:
  DARIO_HOME               folder for config.json and guard-state.json (default ~/.dario)
  DARIO_API_KEY            require this key from clients (x-dario-api-key or
                           Proxy-Authorization: Bearer); resume/status send it too
  DARIO_UPSTREAM_API_KEY   send this key upstream as x-api-key instead of the client's
  DARIO_PORT, DARIO_HOST, DARIO_UPSTREAM, DARIO_LOG_FILE, DARIO_OVERAGE_GUARD,
  DARIO_OVERAGE_BEHAVIOR, DARIO_OVERAGE_COOLDOWN, DARIO_OVERAGE_NOTIFY, DARIO_VERBOSE
                           as the flags above; booleans take 1/0, true/false, on/off, yes/no

Point clients at http://127.0.0.1:3456 (not "localhost": Node tries ::1 first), e.g.
  ANTHROPIC_BASE_URL=http://127.0.0.1:3456 claude
  anthropic.Anthropic(base_url="http://127.0.0.1:3456")
  openai.OpenAI(base_url="http://127.0.0.1:3456/v1", api_key=...)

Exit status: 0 ok; 1 no gateway, cannot bind, or an HTTP error; 2 bad command, flag,
environment value or unsafe bind.
"""


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one line (UsageError) instead of usage + exit."""

    def __init__(self, prog):
        super().__init__(prog=prog, add_help=False, allow_abbrev=False)
        self.add_argument("-h", "--help", action="store_true")

    def error(self, message):
        raise UsageError(message)

    def parse(self, args):
        known, extra = self.parse_known_args(args)
        if extra:
            kind = "flag" if extra[0].startswith("-") else "argument"
            raise UsageError(f"unknown {kind} for `{self.prog}`: {extra[0]}")
        return known


def _setup_logging(verbose=False):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[dario] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # requests/urllib3 debug lines would name upstream URLs on every request.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def _fail(message, status=1):
    print(f"[dario] {message}", file=sys.stderr)
    return status


# -- proxy --------------------------------------------------------------------------

def _proxy_parser():
    p = Parser("dario proxy")
    p.add_argument("--port", dest="port")
    p.add_argument("--host", dest="host")
    p.add_argument("--upstream", dest="upstream.url")
    p.add_argument("--log-file", dest="logFile")
    p.add_argument("--overage-guard", dest="overageGuard.enabled", action="store_const", const=True)
    p.add_argument("--no-overage-guard", dest="overageGuard.enabled", action="store_const", const=False)
    p.add_argument("--overage-behavior", dest="overageGuard.behavior")
    p.add_argument("--overage-cooldown", dest="overageGuard.cooldownMs")
    p.add_argument("--overage-notify", dest="overageGuard.notifyOs", action="store_const", const=True)
    p.add_argument("--no-overage-notify", dest="overageGuard.notifyOs", action="store_const", const=False)
    p.add_argument("-v", "--verbose", dest="verbose", action="store_const", const=True)
    p.add_argument("--unsafe-no-auth", dest="unsafeNoAuth", action="store_true")
    return p


def cmd_proxy(args):
    opts = vars(_proxy_parser().parse(args))
    if opts.pop("help"):
        print(HELP)
        return 0
    flags = {name: value for name, value in opts.items() if value is not None}
    settings = config.resolve(flags, os.environ)
    _setup_logging(settings.verbose)
    for warning in settings.warnings:
        log.warning("%s", warning)
    if not settings.bound_to_loopback and not settings.api_key and not settings.unsafe_no_auth:
        return _fail(
            f"refusing to listen on {settings.host} without DARIO_API_KEY: anyone who can reach "
            "that address could spend your account. Set DARIO_API_KEY=<secret> (clients then send "
            "it as x-dario-api-key), or pass --unsafe-no-auth if the network is protected otherwise.", 2)
    if not settings.bound_to_loopback and not settings.api_key:
        log.warning("listening on %s WITHOUT authentication (--unsafe-no-auth)", settings.host)
    from .server import run
    return run(settings, reload=lambda: config.resolve(flags, os.environ))


# -- resume and status --------------------------------------------------------------

def _client_port(args, prog, extra=(), options=()):
    p = Parser(prog)
    p.add_argument("--port", dest="port")
    for flag in extra:
        p.add_argument(flag, action="store_true")
    for flag in options:
        p.add_argument(flag)
    opts = p.parse(args)
    return opts, config.client_port(opts.port, os.environ)


def cmd_resume(args):
    opts, port = _client_port(args, "dario resume", options=("--account",))
    if opts.help:
        print(HELP)
        return 0
    body = {"account": opts.account} if opts.account else {}
    try:
        status, text = Client(port).request("POST", "/admin/resume", body)
    except GatewayDown:
        return _fail(f"No proxy running on localhost:{port}. Start one with `dario proxy` "
                     "(overage-guard state lives in the running proxy; there is nothing to "
                     "resume on a stopped one).")
    if not 200 <= status < 300:
        return _fail(f"Resume request returned HTTP {status}. Body: {text[:500]}")
    try:
        result = json.loads(text)
    except ValueError:
        return _fail(f"Resume request returned HTTP {status}. Body: {text[:500]}")
    if result.get("wasHalted"):
        print(f"[dario] Resumed at {result.get('resumedAt')}. Proxy returning to normal request handling.")
    else:
        print("[dario] Proxy was not halted — no-op. (Overage-guard state was already clear.)")
    return 0


def cmd_status(args):
    opts, port = _client_port(args, "dario status", ("--json",))
    if opts.help:
        print(HELP)
        return 0
    try:
        status = Client(port).status()
    except GatewayDown:
        return _fail(f"No gateway running on localhost:{port}. Start one with `dario proxy`.")
    except GatewayError as err:
        return _fail(f"Status request returned HTTP {err.status}. Body: {err.body[:500]}")
    if opts.json:
        print(json.dumps(status, indent=2))
        return 0
    from .report import status_text
    print(status_text(status))
    return 0


# -- config -------------------------------------------------------------------------

def cmd_config(args):
    if not args or args[0] in ("-h", "--help"):
        print(HELP)
        return 0 if args else 2
    action, rest = args[0], args[1:]
    path = config.config_path(os.environ)
    file_config = config.load_file(path)
    wanted = {"show": 0, "path": 0, "get": 1, "set": 2}
    if action not in wanted:
        raise UsageError(f"unknown config action {action!r} (use show, path, get KEY or set KEY VALUE)")
    if len(rest) != wanted[action]:
        raise UsageError(f"`config {action}` takes {wanted[action]} argument(s)")
    for warning in file_config.warnings:
        print(f"[dario] warning: {warning}", file=sys.stderr)
    if action == "path":
        print(path)
    elif action == "show":
        shown = {key.name: config.current_value(file_config, key.name) for key in config.SCHEMA}
        print(json.dumps({"path": path, "source": file_config.source, "settings": shown}, indent=2))
    elif action == "get":
        if rest[0] not in config.SCHEMA_BY_NAME:
            return _fail(f"unknown config key {rest[0]!r}; keys: {', '.join(config.SCHEMA_BY_NAME)}", 2)
        print(json.dumps(config.current_value(file_config, rest[0])))
    else:
        key, text = rest
        try:
            value = config.parse_value(key, text)
        except config.ConfigError as err:
            return _fail(str(err), 2)
        if file_config.source == "invalid":
            return _fail(f"not changing {path}: it is not valid JSON. Fix or remove it first.")
        try:
            config.save_file(path, config.with_value(file_config.raw, key, value))
        except OSError as err:
            return _fail(f"cannot write {path}: {err.strerror or err}")
        print(f"[dario] {key} = {json.dumps(config._plain(value, config.SCHEMA_BY_NAME[key].kind))} "
              f"saved to {path}")
    return 0


# -- notify-test --------------------------------------------------------------------

def cmd_notify_test(args):
    if args and args[0] in ("-h", "--help"):
        print(HELP)
        return 0
    if args:
        raise UsageError(f"unknown argument for `dario notify-test`: {args[0]}")
    _setup_logging()
    from .alerts import Alerts
    from .notify import Notifier
    settings = config.resolve({}, os.environ)
    for warning in settings.warnings:
        log.warning("%s", warning)
    event = {"event": "test", "reason": "notify_test", "message": "dario notify-test: alerts reach you"}
    notifier = Notifier(settings.guard.notify_os)
    notifier.notify("dario test", event["message"])
    print("bell: rung on stderr")
    print("desktop: " + ("sent (best effort; cannot be confirmed)" if settings.guard.notify_os
                         else "off (overageGuard.notifyOs)"))
    alerts = Alerts(settings.notify_command, settings.notify_webhook, origin="dario notify-test")
    if not alerts.configured:
        print("notifyCommand, notifyWebhook: not configured (see `dario config set notifyWebhook URL`)")
        return 0
    results = alerts.deliver(event)
    for channel in ("command", "webhook"):
        if channel in results:
            ok, detail = results[channel]
            print(f"{channel}: {'ok' if ok else 'FAILED'} ({detail})")
    return 0 if all(ok for ok, _ in results.values()) else 1


# -- service ------------------------------------------------------------------------

def cmd_service(args):
    from .service import cmd_service as service
    return service(args)


# -- demo ---------------------------------------------------------------------------

def cmd_demo(args):
    _setup_logging()
    from .demo import cmd_demo as demo
    return demo(args)


# -- entry point --------------------------------------------------------------------

COMMANDS = {
    "proxy": cmd_proxy,
    "resume": cmd_resume,
    "status": cmd_status,
    "config": cmd_config,
    "demo": cmd_demo,
    "notify-test": cmd_notify_test,
    "service": cmd_service,
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if (not argv or argv[0].startswith("--port")) and sys.stdin.isatty() and sys.stdout.isatty():
        from .tui import main as tui_main
        return tui_main(argv)
    if not argv or argv[0] in ("help", "-h", "--help"):
        print(HELP)
        return 0
    if argv[0] == "--version":
        print(f"dario {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    try:
        if command is None:
            kind = "flag" if argv[0].startswith("-") else "command"
            raise UsageError(f"unknown {kind}: {argv[0]}")
        return command(argv[1:])
    except UsageError as err:
        return _fail(f"{err}. Run `python dario.py help` for commands and flags.", 2)
    except config.ConfigError as err:
        return _fail(f"{err}.", 2)
    except KeyboardInterrupt:
        return 130
