"""A home others can write is refused at start, the way ssh's StrictModes refuses one."""

import os
import re
import signal
import subprocess
import sys

import pytest

from dario_lib import homecheck

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DARIO = [sys.executable, os.path.join(ROOT, "dario.py")]

pytestmark = pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX owners and modes")


def environ(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARIO_")}
    env.update(DARIO_HOME=str(home), DARIO_OVERAGE_NOTIFY="off")
    return env


def refused(home, *args):
    done = subprocess.run(DARIO + ["proxy", "--port=0", *args], env=environ(home), capture_output=True,
                          text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "--unsafe-home" in done.stderr
    return done.stderr


def test_a_home_anyone_can_write_is_refused(home):
    os.chmod(home, 0o777)
    err = refused(home)
    assert f"[dario] unsafe home: {home} is writable by group and others (mode 0777): " \
           f"fix with `chmod go-w {home}`" in err


def test_a_config_owned_by_another_user_is_refused(home):
    config = home / "config.json"
    config.write_text('{"notifyCommand": ["sh", "-c", "echo owned"]}')
    os.chown(config, 65534, -1)
    err = refused(home)
    me = homecheck._user(os.geteuid())
    assert f"{config} is owned by {homecheck._user(65534)}, not by {me} who runs dario: " \
           f"fix with `chown {me} {config}`" in err


def test_a_group_writable_ledger_is_refused(home):
    ledger = home / "spend-ledger.jsonl"
    ledger.write_text("")
    os.chmod(ledger, 0o620)
    assert f"{ledger} is writable by group (mode 0620): fix with `chmod go-w {ledger}`" in refused(home)


def test_a_symlinked_state_file_is_refused(home, tmp_path):
    target = tmp_path / "somewhere.json"
    target.write_text('{"halts": []}')
    (home / "guard-state.json").symlink_to(target)
    err = refused(home)
    assert f"{home / 'guard-state.json'} is a symlink" in err and "cp -L" in err


def test_unsafe_home_starts_with_a_loud_line_per_problem(home):
    os.chmod(home, 0o777)
    (home / "guard-state.json").symlink_to(home / "nowhere")
    proc = subprocess.Popen(DARIO + ["proxy", "--port=0", "--unsafe-home"], env=environ(home),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if re.search(r"listening on http://127\.0\.0\.1:\d+", line):
                break
        log = "".join(lines)
        assert "listening on" in log, log
        assert log.count("UNSAFE HOME (--unsafe-home)") == 2
        assert f"chmod go-w {home}" in log and f"rm {home / 'guard-state.json'}" in log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    assert proc.returncode == 0


def test_a_safe_home_has_no_problems(home):
    (home / "config.json").write_text("{}")
    os.chmod(home, 0o700)
    assert homecheck.problems(str(home)) == []
    assert homecheck.problems(str(home / "missing")) == []


def test_root_owned_files_are_accepted_for_any_user(home):
    (home / "config.json").write_text("{}")
    if os.stat(home).st_uid != 0:
        pytest.skip("needs files owned by root")
    assert homecheck.problems(str(home), euid=1000) == []
    os.chown(home / "config.json", 1000, -1)
    assert homecheck.problems(str(home), euid=1000) == []
    assert len(homecheck.problems(str(home), euid=1001)) == 1


def test_a_home_reached_through_a_symlink_is_fine(home, tmp_path):
    link = tmp_path / "linked-home"
    link.symlink_to(home)
    assert homecheck.problems(str(link)) == []
