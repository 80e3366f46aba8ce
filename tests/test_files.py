"""files.py: atomic writes, and the spare descriptor that lets a halt be saved at the limit."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from dario_lib import files
from dario_lib.files import Reserve, write_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_write_atomic_replaces_a_symlink_instead_of_following_it(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    link = tmp_path / "guard-state.json"
    link.symlink_to(target)
    write_atomic(str(link), b"new")
    assert target.read_text() == "keep"
    assert not link.is_symlink() and link.read_text() == "new"
    assert oct(link.stat().st_mode & 0o777) == oct(0o600)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dario-")] == []


def test_retry_frees_the_spare_once_on_emfile_and_takes_it_back():
    reserve = Reserve()
    assert reserve.held
    calls = []

    def fn():
        calls.append(reserve.held)
        if len(calls) == 1:
            raise OSError(24, "Too many open files")
        return "saved"

    assert reserve.retry(fn) == "saved"
    assert calls == [True, False] and reserve.held
    with pytest.raises(OSError):
        reserve.retry(lambda: (_ for _ in ()).throw(OSError(2, "No such file")))
    assert reserve.held
    reserve.close()


def test_the_process_reserve_is_one_object():
    assert files.process_reserve() is files.process_reserve()


# In a child: lower RLIMIT_NOFILE, build the state file and ledger (which take the spare),
# open descriptors until EMFILE, then save a halt and append spend.
CHILD = textwrap.dedent("""
    import json, os, resource, sys
    sys.path.insert(0, sys.argv[1])
    from dario_lib.statefile import StateFile
    from dario_lib.budgets import Ledger
    home = sys.argv[2]
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    state = StateFile(os.path.join(home, "guard-state.json"))
    ledger = Ledger(os.path.join(home, "spend-ledger.jsonl"))
    hoard = []
    try:
        while True:
            hoard.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as err:
        assert err.errno == 24, err
    state.write([{"since": 1, "cooldownUntil": None, "reason": "overage_detected"}])
    ledger.append(1, "key:aaaaaaaa", 0.5)
    status, halts = state.read()
    print(json.dumps({"status": status, "halts": halts, "ledger": ledger.load()}))
""")


def test_a_halt_is_saved_and_spend_appended_with_every_descriptor_taken(tmp_path):
    done = subprocess.run([sys.executable, "-c", CHILD, ROOT, str(tmp_path)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["status"] == "ok" and out["halts"][0]["since"] == 1
    assert out["ledger"] == [[1, "key:aaaaaaaa", 0.5]]
    on_disk = json.loads((tmp_path / "guard-state.json").read_text())
    assert on_disk == {"halts": [{"since": 1, "cooldownUntil": None, "reason": "overage_detected"}]}
