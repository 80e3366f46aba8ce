"""`dario service`: the systemd unit and launchd plist, and installing them into a fake home.

Every test passes its own environment (HOME, XDG_CONFIG_HOME, DARIO_HOME under tmp_path),
so nothing here reads or writes the real home.
"""

import configparser
import io
import os
import plistlib
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from dario_lib import cli, service

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DARIO_PY = os.path.join(ROOT, "dario.py")
PYTHON = os.path.abspath(sys.executable)

HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "read-only",
    "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "LockPersonality": "yes",
    "RestrictRealtime": "yes", "SystemCallArchitectures": "native", "UMask": "0077",
    # Room for many clients and a descriptor for saving a halt (issue 10 item 6).
    "LimitNOFILE": "65536",
}


@pytest.fixture
def env(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    return {"HOME": str(user), "XDG_CONFIG_HOME": str(user / "xdg"), "DARIO_HOME": str(user / "dario-home")}


def run(args, env, platform="linux"):
    out = io.StringIO()
    status = service.cmd_service(args, env=env, platform=platform, out=out)
    return status, out.getvalue()


def parse_unit(text):
    parser = configparser.ConfigParser(strict=True, interpolation=None, delimiters=("=",))
    parser.optionxform = str                # systemd keys are case-sensitive
    parser.read_string(text)                # strict: a duplicate key would raise here
    return parser


# -- print --------------------------------------------------------------------------

def test_systemd_unit_runs_this_python_on_this_checkout(env):
    status, text = run(["print", "--systemd"], env)
    assert status == 0
    unit = parse_unit(text)
    assert unit.sections() == ["Unit", "Service", "Install"]
    svc = unit["Service"]
    assert shlex.split(svc["ExecStart"]) == [PYTHON, DARIO_PY, "proxy"]
    assert svc["Restart"] == "on-failure" and svc["RestartSec"] == "2"
    assert svc["Environment"] == "DARIO_HOME=" + env["DARIO_HOME"]
    assert svc["ReadWritePaths"] == env["DARIO_HOME"]
    assert svc["KillSignal"] == "SIGTERM" and svc["TimeoutStopSec"] == "15"
    assert svc["Type"] in ("simple", "notify")
    for key, value in HARDENING.items():
        assert svc[key] == value, key
    assert unit["Unit"]["Documentation"].split()[0] == "man:dario(1)"
    assert unit["Unit"]["After"] == "network-online.target"
    assert unit["Install"]["WantedBy"] == "default.target"


def test_dario_home_defaults_to_dot_dario_and_is_made_absolute(env, monkeypatch, tmp_path):
    del env["DARIO_HOME"]
    svc = parse_unit(run(["print", "--systemd"], env)[1])["Service"]
    assert svc["Environment"] == "DARIO_HOME=" + os.path.join(env["HOME"], ".dario")
    monkeypatch.chdir(tmp_path)
    env["DARIO_HOME"] = "relative/home"
    svc = parse_unit(run(["print", "--systemd"], env)[1])["Service"]
    assert svc["ReadWritePaths"] == str(tmp_path / "relative" / "home")


def test_paths_are_quoted_and_escaped_for_systemd(env, tmp_path):
    home = str(tmp_path / "my dario 100%")
    env["DARIO_HOME"] = home
    svc = parse_unit(run(["print", "--systemd"], env)[1])["Service"]
    escaped = home.replace("%", "%%")
    assert svc["ReadWritePaths"] == f'"{escaped}"'
    assert svc["Environment"] == f'"DARIO_HOME={escaped}"'
    assert service.systemd_quote('a"b\\c d') == '"a\\"b\\\\c d"'
    assert service.systemd_quote("/x/$HOME", exec_line=True) == "/x/$$HOME"
    assert service.systemd_quote("/x/$HOME") == "/x/$HOME"


def test_secrets_are_never_written_into_a_unit(env, capsys):
    env["DARIO_API_KEY"] = "sk-gw-Q7ZX1"
    env["DARIO_UPSTREAM_API_KEY"] = "sk-ant-up-Q7ZX2"
    _, text = run(["print", "--systemd"], env)
    assert "Q7ZX" not in text
    assert "systemctl --user edit dario" in text and "EnvironmentFile=" in text and "0600" in text
    assert "DARIO_API_KEY" not in parse_unit(text)["Service"]["Environment"]
    _, plist = run(["print", "--launchd"], env)
    assert "Q7ZX" not in plist
    assert "DARIO_API_KEY is set but not written" in capsys.readouterr().err


def test_launchd_plist(env):
    status, text = run(["print", "--launchd"], env, platform="linux")
    assert status == 0
    plist = plistlib.loads(text.encode())
    logs = os.path.join(env["DARIO_HOME"], "logs")
    assert plist["Label"] == service.LABEL
    assert plist["ProgramArguments"] == [PYTHON, DARIO_PY, "proxy"]
    assert plist["EnvironmentVariables"] == {"DARIO_HOME": env["DARIO_HOME"]}
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] in (True, {"SuccessfulExit": False})
    assert plist["StandardOutPath"] == os.path.join(logs, "dario.out.log")
    assert plist["StandardErrorPath"] == os.path.join(logs, "dario.err.log")
    assert plist["SoftResourceLimits"] == {"NumberOfFiles": 65536}
    assert plist["HardResourceLimits"] == {"NumberOfFiles": 65536}
    assert plist["ProcessType"] == "Background"


def test_platform_picks_the_kind_and_the_last_flag_wins(env):
    assert run(["print"], env, platform="linux")[1].startswith("# dario")
    assert run(["print"], env, platform="darwin")[1].startswith("<?xml")
    assert run(["print", "--systemd", "--launchd"], env)[1].startswith("<?xml")
    assert run(["print", "--launchd", "--systemd"], env, platform="darwin")[1].startswith("# dario")


def test_unsupported_platform_exits_2_unless_told(env, capsys):
    assert run(["print"], env, platform="win32") == (2, "")
    err = capsys.readouterr().err
    assert "unsupported platform; pass --systemd or --launchd" in err and err.count("\n") == 1
    assert run(["print", "--systemd"], env, platform="win32")[0] == 0


@pytest.mark.parametrize("args, named", [
    (["print", "--upstart"], "--upstart"), (["restart"], "restart"), ([], "action"),
    (["print", "extra"], "extra"), (["--systemd"], "action"),
])
def test_usage_mistakes_are_one_line_and_exit_2(env, args, named, monkeypatch, capsys):
    with pytest.raises(cli.UsageError, match=named):
        run(args, env)
    # Through cli.main, as `python dario.py service ...` runs it once wired in.
    monkeypatch.setitem(cli.COMMANDS, "service", service.cmd_service)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["service", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "help" in err


def test_help(env):
    status, text = run(["install", "--help"], env)
    assert status == 0 and "print,install,uninstall" in text and "--launchd" in text


# -- install and uninstall ----------------------------------------------------------

def test_install_systemd_into_xdg_config_home(env):
    status, out = run(["install", "--systemd"], env)
    path = os.path.join(env["XDG_CONFIG_HOME"], "systemd", "user", "dario.service")
    assert status == 0 and f"wrote {path}" in out
    assert "systemctl --user daemon-reload && systemctl --user enable --now dario.service" in out
    with open(path) as fh:
        assert fh.read() == run(["print", "--systemd"], env)[1]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(env["DARIO_HOME"]).st_mode) == 0o700     # ReadWritePaths needs it
    assert os.listdir(os.path.dirname(path)) == ["dario.service"]       # no temp file left

    status, out = run(["install"], env)
    assert status == 0 and "already up to date" in out

    env["DARIO_HOME"] = env["DARIO_HOME"] + "-2"
    status, out = run(["install"], env)
    assert status == 0 and f"updated {path}" in out and "restart dario.service" in out
    with open(path) as fh:
        assert "ReadWritePaths=" + env["DARIO_HOME"] in fh.read()


@pytest.mark.parametrize("xdg", [None, "", "relative/xdg"])
def test_install_systemd_falls_back_to_home_dot_config(env, xdg):
    env.pop("XDG_CONFIG_HOME")
    if xdg is not None:
        env["XDG_CONFIG_HOME"] = xdg
    run(["install", "--systemd"], env)
    assert os.path.isfile(os.path.join(env["HOME"], ".config", "systemd", "user", "dario.service"))


def test_uninstall_systemd_removes_the_unit_and_its_enable_links(env):
    run(["install"], env)
    folder = os.path.join(env["XDG_CONFIG_HOME"], "systemd", "user")
    path = os.path.join(folder, "dario.service")
    wants = os.path.join(folder, "default.target.wants")
    os.makedirs(wants)
    os.symlink(path, os.path.join(wants, "dario.service"))       # what `systemctl enable` leaves
    status, out = run(["uninstall"], env)
    assert status == 0 and f"removed {path}" in out and "systemctl --user stop dario.service" in out
    assert not os.path.lexists(path) and os.listdir(wants) == []
    assert os.path.isdir(env["DARIO_HOME"])                        # config and halt state stay
    status, out = run(["uninstall"], env)
    assert status == 0 and "nothing to remove" in out


def test_install_and_uninstall_launchd(env):
    status, out = run(["install", "--launchd"], env)
    path = os.path.join(env["HOME"], "Library", "LaunchAgents", service.LABEL + ".plist")
    assert status == 0 and f"wrote {path}" in out
    assert f"launchctl bootstrap gui/$(id -u) {path}" in out
    with open(path, "rb") as fh:
        assert plistlib.load(fh)["ProgramArguments"] == [PYTHON, DARIO_PY, "proxy"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert os.path.isdir(os.path.join(env["DARIO_HOME"], "logs"))   # launchd won't create it
    status, out = run(["uninstall", "--launchd"], env)
    assert status == 0 and "launchctl bootout gui/$(id -u)/" + service.LABEL in out
    assert not os.path.exists(path)


def test_install_reports_an_unwritable_folder(env, capsys):
    os.makedirs(env["XDG_CONFIG_HOME"])
    with open(os.path.join(env["XDG_CONFIG_HOME"], "systemd"), "w"):
        pass                                                        # a file where a folder goes
    assert run(["install"], env)[0] == 1
    err = capsys.readouterr().err
    assert err.startswith("[dario] cannot install the systemd unit") and "Traceback" not in err


# -- the real thing, where available ------------------------------------------------

@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit(env, tmp_path):
    os.makedirs(env["DARIO_HOME"])
    unit = tmp_path / "dario.service"
    unit.write_text(run(["print", "--systemd"], env)[1])
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "dario.service" not in result.stderr:
        pytest.skip("systemd-analyze cannot run here: " + result.stderr.strip()[:200])
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif("service" not in cli.COMMANDS, reason="`service` is not in cli.COMMANDS yet")
def test_dario_py_service_print(env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DARIO_")}
    environ.update(env)
    result = subprocess.run([sys.executable, DARIO_PY, "service", "print", "--systemd"],
                            capture_output=True, text=True, env=environ, timeout=30)
    assert result.returncode == 0 and result.stderr == ""
    assert shlex.split(parse_unit(result.stdout)["Service"]["ExecStart"]) == [PYTHON, DARIO_PY, "proxy"]
