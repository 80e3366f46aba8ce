"""Claude Code, the real CLI, as a client of a gateway in tests.

The pinned CLI lives in <repo>/.cache/claude-code, put there by .ci/install-claude-code.
`claude_binary()` finds it (installing it first when npm is there); `ClaudeCode.run()`
runs one `claude -p PROMPT --output-format json` against a gateway on 127.0.0.1, offline:
its own HOME and TMPDIR, a test API key, no telemetry or update checks, and none of the
caller's ANTHROPIC_*, CLAUDE_* or proxy variables.

Each run is a child process waited on with a timeout; nothing here starts threads.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
INSTALLER = REPO / ".ci" / "install-claude-code"
BINARY = REPO / ".cache" / "claude-code" / "node_modules" / ".bin" / "claude"
API_KEY = "sk-ant-dario-test"
INSTALL_TIMEOUT_S = 900  # a first install fetches a native binary of about 400 MB
RUN_TIMEOUT_S = 30  # a run against the simulator takes about half a second


def claude_binary():
    """The pinned CLI's path, installed first when npm is there; None without npm or CLI.

    With npm the installer always runs: it returns at once when the pinned version is
    in place, and replaces a stale one. Raises RuntimeError if the install fails.
    """
    if shutil.which("npm"):
        proc = subprocess.run(["bash", str(INSTALLER)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=INSTALL_TIMEOUT_S)
        if proc.returncode != 0 or not BINARY.exists():
            raise RuntimeError(f"{INSTALLER} failed (exit {proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}")
    return BINARY if BINARY.exists() else None


@dataclasses.dataclass
class Run:
    """One finished `claude -p` run."""

    returncode: int
    result: dict  # the JSON result object; {} if stdout held none
    stdout: str
    stderr: str
    seconds: float  # wall time

    @property
    def text(self):
        """What Claude Code printed as the answer (or the error) of the run."""
        return self.result.get("result", "")


class ClaudeCode:
    """Runs the CLI in a sandbox under `root`: home/, tmp/ and work/ (the project)."""

    def __init__(self, binary, root):
        self.binary = binary
        self.home, self.tmp, self.work = root / "home", root / "tmp", root / "work"
        for path in (self.home, self.tmp, self.work):
            path.mkdir(parents=True, exist_ok=True)

    def env(self, port, headers=None):
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("ANTHROPIC_", "CLAUDE_"))
               # A proxy from the caller's environment would carry the loopback requests.
               and not name.lower().endswith("_proxy")}
        env.update(
            HOME=str(self.home),
            TMPDIR=str(self.tmp),  # else it leaves probe folders in /tmp/claude-<uid>
            ANTHROPIC_BASE_URL=f"http://127.0.0.1:{port}",
            ANTHROPIC_API_KEY=API_KEY,
            # No telemetry, error reports, update checks or reachability probes: the
            # gateway is the only address the CLI then contacts.
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        )
        if headers:
            env["ANTHROPIC_CUSTOM_HEADERS"] = "\n".join(f"{k}: {v}" for k, v in headers.items())
        return env

    def run(self, port, prompt, *args, headers=None, timeout=RUN_TIMEOUT_S):
        """Run `claude -p prompt --output-format json *args` against 127.0.0.1:port.

        `headers` go on every API request (ANTHROPIC_CUSTOM_HEADERS). A run that outlasts
        `timeout` is killed and fails the test with what it printed.
        """
        command = [str(self.binary), "-p", prompt, "--output-format", "json", *args]
        started = time.monotonic()
        try:
            proc = subprocess.run(command, cwd=self.work, env=self.env(port, headers),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"claude -p did not finish within {timeout} s (retrying?); "
                f"stdout: {exc.stdout!r}; stderr: {exc.stderr!r}") from None
        seconds = time.monotonic() - started
        try:
            result = json.loads(proc.stdout)
        except ValueError:
            result = {}
        return Run(proc.returncode, result if isinstance(result, dict) else {},
                   proc.stdout, proc.stderr, seconds)
