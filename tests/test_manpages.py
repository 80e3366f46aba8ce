"""The man pages: they render without a warning and cover every flag, variable and key."""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from dario_lib import config, service

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = {"dario.1": os.path.join(ROOT, "man", "dario.1"),
         "dario-config.5": os.path.join(ROOT, "man", "dario-config.5")}


def source(name):
    with open(PAGES[name], encoding="utf-8") as fh:
        return fh.read()


def plain(name):
    """The page's source with the escapes that matter here undone."""
    text = source(name).replace("\\-", "-").replace("\\(dq", '"').replace("\\(aq", "'")
    return re.sub(r"\\f[BIRP]", "", text)


def mentions(text, word):
    return re.search(r"(?<![\w-])" + re.escape(word) + r"(?![\w-])", text) is not None


@pytest.fixture(scope="module")
def help_text():
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DARIO_")}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "dario.py"), "--help"],
                            capture_output=True, text=True, env=environ, timeout=30)
    assert result.returncode == 0
    return result.stdout


@pytest.mark.skipif(not shutil.which("groff"), reason="groff not installed")
@pytest.mark.parametrize("device", [None, "utf8"])
@pytest.mark.parametrize("name", sorted(PAGES))
def test_page_renders_without_warnings(name, device):
    command = ["groff", "-man", "-ww", "-z"] + ([f"-T{device}"] if device else []) + [PAGES[name]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stderr


def test_every_flag_in_help_is_in_dario_1(help_text):
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", help_text)) | {"-v", "-h"}
    assert {"--port", "--overage-cooldown", "--unsafe-no-auth", "--json"} <= flags
    page = plain("dario.1")
    missing = sorted(flag for flag in flags if not mentions(page, flag))
    assert not missing, f"flags in --help but not in man/dario.1: {missing}"


def test_every_env_var_in_help_is_in_dario_1(help_text):
    names = set(re.findall(r"DARIO_[A-Z_]+", help_text))
    assert {"DARIO_HOME", "DARIO_API_KEY", "DARIO_UPSTREAM_API_KEY", "DARIO_VERBOSE"} <= names
    page = plain("dario.1")
    missing = sorted(name for name in names if not mentions(page, name))
    assert not missing, f"variables in --help but not in man/dario.1: {missing}"
    environment = page.split(".SH ENVIRONMENT", 1)[1].split(".SH ", 1)[0]
    missing = sorted(name for name in names if not re.search(rf"^\.B {name}$", environment, re.M))
    assert not missing, f"variables without an entry in ENVIRONMENT: {missing}"


def test_every_command_in_help_is_in_dario_1(help_text):
    commands_block = help_text.split("Commands:", 1)[1].split("\n\n", 1)[0]
    commands = set(re.findall(r"^  ([a-z][a-z-]+)", commands_block, re.M)) | {"service"}
    assert {"proxy", "resume", "status", "config", "demo"} <= commands
    section = plain("dario.1").split(".SH COMMANDS", 1)[1].split(".SH ", 1)[0]
    missing = sorted(c for c in commands if not re.search(rf"^\.(B|BR|BI) \"?{c}\b", section, re.M))
    assert not missing, f"commands without an entry in COMMANDS: {missing}"


def test_dario_1_has_the_sections_and_the_contract_texts():
    page = plain("dario.1")
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "ENVIRONMENT", "FILES",
                    "ENDPOINTS", "EXIT STATUS", "SECURITY", "EXAMPLES", "SEE ALSO"):
        assert f".SH {section}\n" in page, section
    for text in ("Retry-After", "x-should-retry: false", "dario_overage_guard", "guard-state.json",
                 "ANTHROPIC_BASE_URL=http://127.0.0.1:3456", "/analytics/stream", "/admin/resume",
                 "Gateway was not halted", "No gateway running on 127.0.0.1:", "Resume request returned HTTP",
                 "dario-config (5)"):
        assert text in page, text


def entry(page, key):
    """The text of a `.TP` / `.B key` entry up to the next entry or section."""
    found = re.search(rf"^\.TP\n\.B {re.escape(key)}\n(.*?)(?=^\.(TP|SS|SH)\b)", page, re.M | re.S)
    return found.group(1) if found else None


@pytest.mark.parametrize("key", [key.name for key in config.SCHEMA])
def test_every_config_key_is_in_dario_config_5_with_default_and_range(key):
    spec = config.SCHEMA_BY_NAME[key]
    text = entry(plain("dario-config.5"), key)
    assert text is not None, f"{key} has no entry in man/dario-config.5"
    default = config._plain(spec.default, spec.kind)
    shown = default if isinstance(default, str) else json.dumps(default)
    assert mentions(text, shown) or shown in text, f"{key}: default {shown} not stated"
    for bound in ("lo", "hi"):
        if hasattr(spec.kind, bound):
            assert str(getattr(spec.kind, bound)) in text, f"{key}: {bound} not stated"
    for choice in getattr(spec.kind, "choices", ()):
        assert f'"{choice}"' in text, f"{key}: choice {choice} not stated"
    for what in (spec.flag, spec.env):
        if what:
            assert what in text, f"{key}: {what} not named"


def test_the_example_config_file_is_valid():
    page = source("dario-config.5")
    example = page.split(".SH EXAMPLES", 1)[1].split(".nf\n", 1)[1].split(".fi\n", 1)[0]
    raw = json.loads(example.replace("\\-", "-"))
    values, warnings = config.sanitize(raw)
    assert warnings == [] and "guards.budgets" in values and "accounts" in values


@pytest.mark.skipif(not (shutil.which("systemd-analyze") and shutil.which("man")),
                    reason="needs systemd-analyze and man")
def test_the_units_documentation_resolves_to_these_pages(tmp_path):
    for name, path in PAGES.items():
        folder = tmp_path / "man" / ("man" + name[-1])
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(path, folder / name)
    home = tmp_path / "home"
    home.mkdir()
    out = io.StringIO()
    service.cmd_service(["print", "--systemd"], env={"HOME": str(tmp_path), "DARIO_HOME": str(home)},
                        out=out)
    unit = tmp_path / "dario.service"
    unit.write_text(out.getvalue())
    environ = dict(os.environ, MANPATH=str(tmp_path / "man"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                            env=environ, timeout=60)
    if result.returncode != 0 and "dario" not in result.stderr:
        pytest.skip("systemd-analyze cannot run here: " + result.stderr.strip()[:200])
    assert result.returncode == 0, result.stderr
