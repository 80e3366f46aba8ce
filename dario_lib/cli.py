"""Command line: `python dario.py <command> [flags]`. `main(argv) -> exit status`.

Logging is configured here and nowhere else. Every mistake on the command line is one
line on stderr naming what is wrong plus a hint, and exit status 2.

Everything written to the terminal is inert (`inert.terminal`): log lines through the
formatter `_setup_logging` installs, whatever module wrote them and with whatever
arguments; the commands' own lines through `_say`; and another program's answer (the
gateway's body on an error) is filtered and capped before it is quoted.
"""

import argparse
import json
import logging
import os
import sys

from . import __version__, config, guardtext, inert, report
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
  config show              the settings in $DARIO_HOME/config.json (with defaults) as
                           JSON, credentials masked
  config path              where the config file lives
  config get KEY           one setting, e.g. overageGuard.cooldownMs (masked likewise)
  config set KEY VALUE [--port=N]
                           validate and save one setting: through the gateway that
                           answers on the port (its own config file, applied at once),
                           or into $DARIO_HOME/config.json when none does (atomic write)
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
  --upstream-proxy=URL     reach an https upstream through this HTTP proxy
                           (http://[user:password@]host:port; "direct" for none);
                           default: HTTPS_PROXY and NO_PROXY                       [DARIO_UPSTREAM_PROXY]
  --log-file=PATH          append one JSON line per request record                 [DARIO_LOG_FILE]
  --store=URL              where halts and budget spend live: file ($DARIO_HOME, the
                           default) or a Redis store a team of gateways shares:
                           redis://[user:password@]host:port/db, rediss://... (TLS),
                           unix:///path/redis.sock[?db=N];
                           needs the redis package (pip install 'redis>=5.0')      [DARIO_STORE]
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
  --unsafe-home            start even when DARIO_HOME or a file in it is writable by
                           others, owned by another user, or a symlink (refused
                           otherwise, exit 2)

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
  DARIO_STORE_PASSWORD     the password of a Redis --store whose URL names none (never shown)
  HTTPS_PROXY, NO_PROXY    the proxy for an https upstream, as requests reads them
                           (--upstream-proxy overrides them)
  DARIO_PORT, DARIO_HOST, DARIO_UPSTREAM, DARIO_UPSTREAM_PROXY, DARIO_LOG_FILE,
  DARIO_STORE, DARIO_OVERAGE_GUARD, DARIO_OVERAGE_BEHAVIOR, DARIO_OVERAGE_COOLDOWN,
  DARIO_OVERAGE_NOTIFY, DARIO_VERBOSE
                           as the flags above; booleans take 1/0, true/false, on/off, yes/no

Point clients at http://127.0.0.1:3456 (not "localhost": Node tries ::1 first), e.g.
  ANTHROPIC_BASE_URL=http://127.0.0.1:3456 claude
  anthropic.Anthropic(base_url="http://127.0.0.1:3456")
  openai.OpenAI(base_url="http://127.0.0.1:3456/v1", api_key=...)

Exit status: 0 ok; 1 no gateway, cannot bind, or an HTTP error; 2 bad command, flag,
environment value, unsafe bind or unsafe home.
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


class InertFormatter(logging.Formatter):
    """`[dario] <message>` with the message made inert.

    Log arguments carry text from clients and the upstream (model names, account
    labels, claims, error messages): each line of the message, and of a traceback, goes
    through `inert.terminal`, so nothing logged can write a raw control character or an
    escape sequence to the terminal, split one line into two, or fail to encode.
    """

    PREFIX = "[dario] "

    def format(self, record):
        lines = [self.PREFIX + inert.terminal(record.getMessage())]
        if record.exc_info:
            lines += map(inert.terminal, self.formatException(record.exc_info).splitlines())
        if record.stack_info:
            lines += map(inert.terminal, self.formatStack(record.stack_info).splitlines())
        return "\n".join(lines)


def _setup_logging(verbose=False):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(InertFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # requests/urllib3 debug lines would name upstream URLs on every request.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def _say(text, stream=None):
    """Print dario's text, each line inert, whatever the stream's encoding can hold."""
    stream = stream or sys.stdout
    text = "\n".join(inert.terminal(line) for line in str(text).split("\n"))
    try:
        print(text, file=stream)
    except UnicodeEncodeError:
        # A terminal in a legacy encoding (e.g. Latin-1) that cannot show a model name.
        encoding = getattr(stream, "encoding", None) or "ascii"
        print(text.encode(encoding, "backslashreplace").decode(encoding), file=stream)


def _fail(message, status=1):
    _say(f"[dario] {message}", sys.stderr)
    return status


# -- proxy --------------------------------------------------------------------------

def _proxy_parser():
    p = Parser("dario proxy")
    p.add_argument("--port", dest="port")
    p.add_argument("--host", dest="host")
    p.add_argument("--upstream", dest="upstream.url")
    p.add_argument("--upstream-proxy", dest="upstream.proxy")
    p.add_argument("--log-file", dest="logFile")
    p.add_argument("--store", dest="store.url")
    p.add_argument("--overage-guard", dest="overageGuard.enabled", action="store_const", const=True)
    p.add_argument("--no-overage-guard", dest="overageGuard.enabled", action="store_const", const=False)
    p.add_argument("--overage-behavior", dest="overageGuard.behavior")
    p.add_argument("--overage-cooldown", dest="overageGuard.cooldownMs")
    p.add_argument("--overage-notify", dest="overageGuard.notifyOs", action="store_const", const=True)
    p.add_argument("--no-overage-notify", dest="overageGuard.notifyOs", action="store_const", const=False)
    p.add_argument("-v", "--verbose", dest="verbose", action="store_const", const=True)
    p.add_argument("--unsafe-no-auth", dest="unsafeNoAuth", action="store_true")
    p.add_argument("--unsafe-home", dest="unsafe_home", action="store_true")
    return p


def cmd_proxy(args):
    opts = vars(_proxy_parser().parse(args))
    if opts.pop("help"):
        print(HELP)
        return 0
    unsafe_home = opts.pop("unsafe_home")
    flags = {name: value for name, value in opts.items() if value is not None}
    settings = config.resolve(flags, os.environ)
    _setup_logging(settings.verbose)
    for warning in settings.warnings:
        log.warning("%s", warning)
    from .homecheck import problems
    unsafe = problems(settings.home)
    if unsafe and not unsafe_home:
        for line in unsafe:
            _say(f"[dario] unsafe home: {line}", sys.stderr)
        return _fail("refusing to start: whoever can write these can clear a halt, erase spend or "
                     "choose a program dario runs. Fix them, or pass --unsafe-home to start anyway.", 2)
    for line in unsafe:
        log.warning("UNSAFE HOME (--unsafe-home): %s", line)
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


BODY_LIMIT = 500                # characters of another program's answer quoted on an error


def _not_running(port):
    return f"No gateway running on 127.0.0.1:{port}. Start one with `{report.start_command(port)}`"


def _http_error(what, status, body, client):
    """The one line for an error answer: what to do about a 401, and the body, inert and capped."""
    message = f"{what} request returned HTTP {status}."
    if status == 401:
        message += (" DARIO_API_KEY is set but the gateway refused it: set it to the gateway's key"
                    if client.api_key else " The gateway wants a key: set DARIO_API_KEY to the gateway's key")
        message += " (it is sent as x-dario-api-key)."
    return _fail(f"{message} Body: {inert.terminal(body, BODY_LIMIT)}")


def cmd_resume(args):
    opts, port = _client_port(args, "dario resume", options=("--account",))
    if opts.help:
        print(HELP)
        return 0
    body = {"account": opts.account} if opts.account else {}
    client = Client(port)
    try:
        status, text = client.request("POST", "/admin/resume", body)
    except GatewayDown:
        return _fail(f"{_not_running(port)} (overage-guard state lives in the running gateway; "
                     "there is nothing to resume on a stopped one).")
    try:
        result = json.loads(text) if 200 <= status < 300 else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        return _http_error("Resume", status, text, client)
    if result.get("wasHalted"):
        _say(f"[dario] Resumed at {result.get('resumedAt')}. Gateway returning to normal request handling.")
    else:
        _say("[dario] Gateway was not halted — no-op. (Overage-guard state was already clear.)")
    return 0


def cmd_status(args):
    opts, port = _client_port(args, "dario status", ("--json",))
    if opts.help:
        print(HELP)
        return 0
    client = Client(port)
    try:
        status = client.status()
    except GatewayDown:
        return _fail(f"{_not_running(port)}.")
    except GatewayError as err:
        return _http_error("Status", err.status, err.body, client)
    if opts.json:
        print(json.dumps(status, indent=2))         # ASCII: json escapes everything else
        return 0
    try:
        text = report.status_text(status, command=guardtext.resume_command(port))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return _fail(f"the gateway on 127.0.0.1:{port} sent a /status this dario cannot read "
                     f"({type(err).__name__}: {err}); try `dario status --json`.")
    _say(text)
    return 0


# -- config -------------------------------------------------------------------------

def cmd_config(args):
    if not args or args[0] in ("-h", "--help"):
        print(HELP)
        return 0 if args else 2
    action, rest = args[0], args[1:]
    port_flag, rest = _port_flag(rest) if action == "set" else (None, rest)
    path = config.config_path(os.environ)
    wanted = {"show": 0, "path": 0, "get": 1, "set": 2}
    if action not in wanted:
        raise UsageError(f"unknown config action {action!r} (use show, path, get KEY or set KEY VALUE)")
    if len(rest) != wanted[action]:
        raise UsageError(f"`config {action}` takes {wanted[action]} argument(s)")
    if action == "path":
        print(path)
        return 0
    if action == "set":
        return _config_set(rest[0], rest[1], port_flag, path)
    file_config = config.load_file(path)
    for warning in file_config.warnings:
        _say(f"[dario] warning: {warning}", sys.stderr)
    if action == "show":
        shown = {key.name: _public_json(key.name, config.current_value(file_config, key.name))
                 for key in config.SCHEMA}
        print(json.dumps({"path": path, "source": file_config.source, "settings": shown}, indent=2))
    else:
        if rest[0] not in config.SCHEMA_BY_NAME:
            return _fail(f"unknown config key {rest[0]!r}; keys: {', '.join(config.SCHEMA_BY_NAME)}", 2)
        print(json.dumps(_public_json(rest[0], config.current_value(file_config, rest[0]))))
    return 0


def _port_flag(args):
    """(--port value or None, the other arguments): `config set` takes --port=N or --port N."""
    port, rest, items = None, [], iter(args)
    for arg in items:
        if arg == "--port":
            port = next(items, None)
            if port is None:
                raise UsageError("--port needs a value, e.g. --port=3456")
        elif arg.startswith("--port="):
            port = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return port, rest


def _public_json(name, value):
    """A JSON-ready value as `config show`/`get` print it: credentials masked."""
    kind = config.SCHEMA_BY_NAME[name].kind
    if value is None or not hasattr(kind, "masked"):
        return value
    try:
        return kind.masked(value)
    except ValueError:
        return "(hidden: it may hold credentials)"


def _config_set(key, text, port_flag, path):
    """Through the gateway on the port when one answers (its own file, applied at once);
    into $DARIO_HOME/config.json when none does."""
    try:
        value = config.parse_value(key, text)
    except config.ConfigError as err:
        return _fail(str(err), 2)
    shown = json.dumps(config.public_value(key, value))
    port = config.client_port(port_flag, os.environ)
    client = Client(port)
    try:
        answer = client.set_config({key: text})
    except GatewayDown:
        return _config_set_file(key, value, shown, path, port)
    except GatewayError as err:
        if err.status in (404, 405):
            return _fail(f"the gateway on 127.0.0.1:{port} cannot change its config over HTTP (HTTP {err.status}: "
                         "an older dario?); nothing was changed. Edit its config file and send it SIGHUP, "
                         "or restart it.")
        if err.status in (400, 409):
            return _fail(f"the gateway on 127.0.0.1:{port} did not change its config: {_error_message(err.body)}")
        return _http_error("Config", err.status, err.body, client)
    where = f"the gateway on 127.0.0.1:{port}"
    if key in (answer.get("pending") or ()):
        _say(f"[dario] {key} = {shown} saved to {answer.get('path')}; {where} applies it when it restarts")
    else:
        _say(f"[dario] {key} = {shown} saved to {answer.get('path')} and applied by {where}")
    source = (answer.get("overridden") or {}).get(key)
    if source:
        _say(f"[dario] note: {where} takes {key} from its {'flag' if source == 'flag' else 'environment'}, "
             "which outranks the file: the saved value applies once that is gone", sys.stderr)
    return 0


def _config_set_file(key, value, shown, path, port):
    file_config = config.load_file(path)
    for warning in file_config.warnings:
        _say(f"[dario] warning: {warning}", sys.stderr)
    if file_config.source == "invalid":
        return _fail(f"not changing {path}: it is not valid JSON. Fix or remove it first.")
    try:
        config.save_file(path, config.with_value(file_config.raw, key, value))
    except OSError as err:
        return _fail(f"cannot write {path}: {err.strerror or err}")
    _say(f"[dario] {key} = {shown} saved to {path} (no gateway answers on 127.0.0.1:{port}; "
         "a gateway reads the file when it starts, or on SIGHUP)")
    return 0


def _error_message(body):
    """The message of a gateway's JSON error body, inert and capped (the body if it has none)."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body
    return inert.terminal(str(message), BODY_LIMIT)


# -- notify-test --------------------------------------------------------------------

def cmd_notify_test(args):
    if args and args[0] in ("-h", "--help"):
        print(HELP)
        return 0
    if args:
        raise UsageError(f"unknown argument for `dario notify-test`: {args[0]}")
    _setup_logging()
    from .alerts import Alerts
    from .notify import Notifier, secrets_of
    settings = config.resolve({}, os.environ)
    for warning in settings.warnings:
        log.warning("%s", warning)
    event = {"event": "test", "reason": "notify_test", "message": "dario notify-test: alerts reach you"}
    notifier = Notifier(settings.guard.notify_os, secrets=secrets_of(settings))
    notifier.notify("dario test", event["message"])
    print("bell: rung on stderr")
    print("desktop: " + ("sent (best effort; cannot be confirmed)" if settings.guard.notify_os
                         else "off (overageGuard.notifyOs)"))
    alerts = Alerts(settings.notify_command, settings.notify_webhook, origin="dario notify-test",
                    secrets=secrets_of(settings))
    if not alerts.configured:
        print("notifyCommand, notifyWebhook: not configured (see `dario config set notifyWebhook URL`)")
        return 0
    results = alerts.deliver(event)
    for channel in ("command", "webhook"):
        if channel in results:
            ok, detail = results[channel]
            _say(f"{channel}: {'ok' if ok else 'FAILED'} ({detail})")     # detail quotes the program's stderr
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
