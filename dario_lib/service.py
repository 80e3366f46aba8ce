"""`dario service`: run the gateway under the platform's service manager.

`print` writes a systemd user unit (Linux) or a launchd LaunchAgent plist (macOS) to
stdout; `install` writes it where the service manager looks and prints the commands
that enable it (it never runs them); `uninstall` removes it and prints the commands that
stop it. The unit runs this interpreter on this checkout's `dario.py proxy`, with
`DARIO_HOME` fixed to an absolute path, so the service sees the same config and halt
state as `dario resume` run from a shell with the same home.

Secrets are never written into a unit: when `DARIO_API_KEY` or `DARIO_UPSTREAM_API_KEY`
is set, the output says how to hand it to the service instead.

Everything that depends on the machine (environment, platform, interpreter, paths) is
an argument, so tests render and install units into a temporary home.
"""

import os
import plistlib
import re
import shlex
import sys

from .files import write_atomic

UNIT_NAME = "dario.service"
LABEL = "com.dario.gateway"
SECRETS = ("DARIO_API_KEY", "DARIO_UPSTREAM_API_KEY")
ACTIONS = ("print", "install", "uninstall")
# The gateway sends READY=1 once it listens and STOPPING=1 when it drains
# (server.sd_notify), so systemd can wait for a real bind instead of a fork.
SYSTEMD_TYPE = "notify"
OPEN_FILES = 65536                  # the service's RLIMIT_NOFILE (soft and hard)

USAGE = """\
usage: python dario.py service {print,install,uninstall} [--systemd|--launchd]
  print       write the unit to stdout
  install     write it to the user's unit folder and print the commands that enable it
  uninstall   remove it and print the commands that stop it
  --systemd   a systemd user unit (the default on Linux)
  --launchd   a launchd LaunchAgent plist (the default on macOS)"""


class ServiceError(Exception):
    """Something on this machine keeps dario from writing a unit (one line, exit 1)."""


# -- what goes in the unit -----------------------------------------------------------

def dario_home(env):
    """DARIO_HOME as the service will see it: absolute, `~` expanded."""
    home = env.get("DARIO_HOME") or os.path.join(_user_home(env), ".dario")
    return os.path.abspath(os.path.expanduser(home))


def dario_script():
    """This checkout's (or this installation's) `dario.py`, next to the package."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dario.py")


def program(python=None, script=None):
    """The service's argument list: [interpreter, dario.py, "proxy"], all absolute."""
    # abspath, not realpath: a virtualenv's python finds its packages through its symlink.
    python = os.path.abspath(python or sys.executable or "")
    script = os.path.abspath(script or dario_script())
    if not os.path.isfile(python):
        raise ServiceError(f"cannot tell which Python runs dario (sys.executable is {python!r})")
    if not os.path.isfile(script):
        raise ServiceError(f"cannot find dario.py at {script}")
    return [python, script, "proxy"]


def _check_path(path):
    if re.search(r"[\x00-\x1f\x7f]", path):
        raise ServiceError(f"refusing a path with control characters in it: {path!r}")
    return path


def systemd_quote(word, exec_line=False):
    """One word for a unit file: `%` doubled (specifiers), `$` doubled in the arguments
    of an Exec line (variable expansion; systemd takes the executable itself literally,
    so that word passes exec_line=False), and double quotes with C escapes when the word
    has spaces, quotes or backslashes."""
    word = _check_path(word).replace("%", "%%")
    if exec_line:
        word = word.replace("$", "$$")
    if word and not re.search(r"[\s\"'\\;]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(argv, home, env=None):
    """The text of a systemd user unit running `argv` with DARIO_HOME=home."""
    env = env or {}
    if re.search(r"[\"'\\]", argv[0]):
        raise ServiceError(f"systemd refuses an executable path with quotes or backslashes: {argv[0]}")
    exec_start = " ".join(systemd_quote(word, exec_line=i > 0) for i, word in enumerate(argv))
    secrets = [name for name in SECRETS if env.get(name)]
    lines = [
        "# dario: written by `dario service print --systemd`. Settings come from",
        "# $DARIO_HOME/config.json (`dario config set KEY VALUE`), not from your shell's",
        "# DARIO_* variables; `systemctl --user reload dario` re-reads that file.",
        "[Unit]",
        "Description=dario: local Anthropic API gateway with an overage guard",
        "Documentation=man:dario(1) man:dario-config(5)",
        "After=network-online.target",
        "",
        "[Service]",
        f"Type={SYSTEMD_TYPE}",
        f"ExecStart={exec_start}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartSec=2",
        "# Exit status 2 is a bad flag, environment value, unsafe bind or unsafe home:",
        "# restarting won't fix it.",
        "RestartPreventExitStatus=2",
        "# Room for many clients; dario keeps its connection cap below this limit, with",
        "# descriptors to spare for saving a halt.",
        f"LimitNOFILE={OPEN_FILES}",
        f"Environment={systemd_quote('DARIO_HOME=' + home)}",
    ]
    for name in secrets:
        lines += [
            f"# {name} is set in your shell but deliberately not written here. Give it to",
            "# the service with `systemctl --user edit dario` ([Service] then",
            f"# Environment={name}=...), or put {name}=... in a file only you can read",
            "# (chmod 0600) and add EnvironmentFile=/path/to/that/file.",
        ]
    lines += [
        "# SIGTERM drains: requests in flight get up to 10 s to finish.",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=15",
        "SyslogIdentifier=dario",
        "# Hardening. The interpreter and the checkout stay readable under",
        "# ProtectHome=read-only; only DARIO_HOME is writable, so a --log-file outside it",
        "# needs its folder added to ReadWritePaths. In a user manager the namespace",
        "# options (ProtectSystem to ProtectControlGroups) need unprivileged user",
        "# namespaces: if the unit fails with status=226/NAMESPACE, turn them off with",
        "# `systemctl --user edit --full dario`.",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        f"ReadWritePaths={systemd_quote(home)}",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "LockPersonality=yes",
        "RestrictRealtime=yes",
        "SystemCallArchitectures=native",
        "UMask=0077",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]
    return "\n".join(lines) + "\n"


def launchd_plist(argv, home):
    """The bytes of a LaunchAgent plist running `argv` with DARIO_HOME=home."""
    logs = os.path.join(home, "logs")
    return plistlib.dumps({
        "Label": LABEL,
        "ProgramArguments": list(argv),
        "EnvironmentVariables": {"DARIO_HOME": home},
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},     # restart after a crash, not after a stop
        "StandardOutPath": os.path.join(logs, "dario.out.log"),
        "StandardErrorPath": os.path.join(logs, "dario.err.log"),
        "ProcessType": "Background",
        "ExitTimeOut": 15,                          # SIGTERM drains for up to 10 s
        "Umask": 0o077,
        # launchd's default soft limit is 256 open files: room for many clients, with
        # descriptors to spare for saving a halt (dario caps connections below it).
        "SoftResourceLimits": {"NumberOfFiles": OPEN_FILES},
        "HardResourceLimits": {"NumberOfFiles": OPEN_FILES},
    })


# -- where it goes -------------------------------------------------------------------

def _user_home(env):
    return env.get("HOME") or os.path.expanduser("~")


def unit_path(kind, env):
    """Where the service manager looks for a user unit (XDG_CONFIG_HOME, HOME honoured)."""
    if kind == "launchd":
        return os.path.join(_user_home(env), "Library", "LaunchAgents", LABEL + ".plist")
    config_home = env.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(config_home):          # the XDG spec ignores relative paths
        config_home = os.path.join(_user_home(env), ".config")
    return os.path.join(config_home, "systemd", "user", UNIT_NAME)


def render(kind, env, python=None, script=None):
    """The unit for `kind` as bytes."""
    argv = program(python, script)
    home = _check_path(dario_home(env))
    if kind == "launchd":
        return launchd_plist(argv, home)
    return systemd_unit(argv, home, env).encode("utf-8")


def enable_commands(kind, path, updated=False):
    if kind == "launchd":
        commands = [f"launchctl bootstrap gui/$(id -u) {shlex.quote(path)}"]
        if updated:
            commands.insert(0, f"launchctl bootout gui/$(id -u)/{LABEL}   # if it is loaded")
        return commands
    commands = [f"systemctl --user daemon-reload && systemctl --user enable --now {UNIT_NAME}"]
    if updated:
        commands.append(f"systemctl --user restart {UNIT_NAME}   # if it is already running")
    commands.append("loginctl enable-linger \"$USER\"   # optional: keep it running while logged out")
    return commands


def disable_commands(kind):
    if kind == "launchd":
        return [f"launchctl bootout gui/$(id -u)/{LABEL}"]
    return [f"systemctl --user stop {UNIT_NAME} && systemctl --user daemon-reload"]


def _read(path):
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def install(kind, env, out, python=None, script=None):
    data = render(kind, env, python, script)
    path = unit_path(kind, env)
    old = _read(path)
    home = dario_home(env)
    # The unit needs DARIO_HOME to exist: ReadWritePaths= fails to set up the namespace
    # for a missing path, and launchd does not create the folder of its log files.
    os.makedirs(os.path.join(home, "logs") if kind == "launchd" else home, mode=0o700, exist_ok=True)
    if old == data:
        print(f"[dario] {path} is already up to date.", file=out)
    else:
        write_atomic(path, data, mode=0o644, folder_mode=0o755)
        print(f"[dario] {'updated' if old is not None else 'wrote'} {path}", file=out)
    print("Enable and start it with:", file=out)
    for command in enable_commands(kind, path, updated=old is not None and old != data):
        print(f"  {command}", file=out)
    _secret_note(kind, env, path, out)
    return 0


def _secret_note(kind, env, path, out):
    for name in SECRETS:
        if not env.get(name):
            continue
        if kind == "launchd":
            print(f"[dario] note: {name} is set but not written into {path}. Add it under "
                  f"EnvironmentVariables yourself and chmod 0600 the file.", file=out)
        else:
            print(f"[dario] note: {name} is set but not written into the unit. Add it with "
                  f"`systemctl --user edit dario` or an EnvironmentFile= of mode 0600.", file=out)


def uninstall(kind, env, out):
    path = unit_path(kind, env)
    if _read(path) is None:
        print(f"[dario] nothing to remove: {path} does not exist", file=out)
        return 0
    os.unlink(path)
    if kind == "systemd":
        # `systemctl disable` refuses a unit whose file is gone, so drop the links
        # `enable` made (default.target.wants/dario.service) here.
        folder = os.path.dirname(path)
        for entry in os.listdir(folder):
            link = os.path.join(folder, entry, UNIT_NAME)
            if entry.endswith(".wants") and os.path.islink(link):
                os.unlink(link)
    print(f"[dario] removed {path}", file=out)
    print("Stop it with:", file=out)
    for command in disable_commands(kind):
        print(f"  {command}", file=out)
    return 0


# -- the command ---------------------------------------------------------------------

def default_kind(platform):
    if platform.startswith("linux"):
        return "systemd"
    if platform == "darwin":
        return "launchd"
    return None


def cmd_service(args, env=None, platform=None, out=None, python=None, script=None):
    """`dario service {print,install,uninstall} [--systemd|--launchd]` -> exit status."""
    from .cli import UsageError         # cli imports this module
    env = os.environ if env is None else env
    out = sys.stdout if out is None else out
    kind, words = None, []
    for arg in args:
        if arg in ("-h", "--help"):
            print(USAGE, file=out)
            return 0
        if arg in ("--systemd", "--launchd"):
            kind = arg[2:]                  # given twice, the last one wins
        elif arg.startswith("-"):
            raise UsageError(f"unknown flag for `dario service`: {arg}")
        else:
            words.append(arg)
    if not words:
        raise UsageError("`dario service` needs an action: print, install or uninstall")
    action = words[0]
    if action not in ACTIONS:
        raise UsageError(f"unknown service action {action!r} (use print, install or uninstall)")
    if len(words) > 1:
        raise UsageError(f"unknown argument for `dario service {action}`: {words[1]}")
    platform = sys.platform if platform is None else platform
    kind = kind or default_kind(platform)
    if kind is None:
        print(f"[dario] unsupported platform; pass --systemd or --launchd (this is {platform})",
              file=sys.stderr)
        return 2
    try:
        if action == "print":
            out.write(render(kind, env, python, script).decode("utf-8"))
            out.flush()
            if kind == "launchd":           # a plist has no room for the note a unit carries
                _secret_note(kind, env, unit_path(kind, env), sys.stderr)
            return 0
        if action == "install":
            return install(kind, env, out, python, script)
        return uninstall(kind, env, out)
    except ServiceError as err:
        print(f"[dario] {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"[dario] cannot {action} the {kind} unit: {err.strerror or err}"
              f"{': ' + err.filename if err.filename else ''}", file=sys.stderr)
        return 1
