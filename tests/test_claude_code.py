"""Claude Code, the real CLI from npm, through a real gateway in front of the simulator.

The CLI is the pinned version .ci/install-claude-code puts in .cache/ (installed on first
use when npm is there); these tests skip only when npm is missing. Each run is offline and
takes about half a second.
"""

import json

import pytest
import requests

from . import claude_kit
from .helpers import make_settings, running_gateway, wait_until

FAST_S = 10  # "fails within a few seconds": a retrying CLI takes minutes


@pytest.fixture(scope="module")
def claude_binary():
    try:
        binary = claude_kit.claude_binary()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    if binary is None:
        pytest.skip("npm is not installed, so .ci/install-claude-code cannot install the "
                    "Claude Code CLI (@anthropic-ai/claude-code)")
    return binary


@pytest.fixture
def claude(claude_binary, tmp_path):
    return claude_kit.ClaudeCode(claude_binary, tmp_path / "claude-code")


def records(gateway, n):
    """The gateway's records once there are n: the CLI may exit before the last is stored."""
    assert wait_until(lambda: len(gateway.store.snapshot()) >= n), gateway.store.snapshot()
    return gateway.store.snapshot()


def admin(gateway, method, path):
    resp = requests.request(method, f"http://127.0.0.1:{gateway.port}{path}", json={}, timeout=5)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-5"])
def test_a_prompt_is_answered_by_the_simulator_and_costs_what_claude_code_says(
        claude, gateway, sim, model):
    headers = {"x-sim-events": "4", "x-sim-cache-read": "1000", "x-sim-cache-create": "2000"}
    run = claude.run(gateway.port, "Say hi", "--model", model, headers=headers)

    assert run.returncode == 0 and run.result["is_error"] is False, run.stdout + run.stderr
    assert run.text == "word1 word2 word3 word4 "
    assert [req.header("x-api-key") for req in sim.requests] == [claude_kit.API_KEY]
    [record] = records(gateway, 1)
    usage = run.result["usage"]
    assert (record["model"], record["inputTokens"], record["outputTokens"],
            record["cacheReadTokens"], record["cacheCreateTokens"]) == (
        model, usage["input_tokens"], usage["output_tokens"],
        usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"])
    assert record["sessionId"] == run.result["session_id"]
    # Same usage, same price: dario's estimate is Claude Code's own figure (records keep
    # six decimals, /analytics four).
    assert record["costUsd"] == pytest.approx(run.result["total_cost_usd"], abs=1e-6)
    analytics = admin(gateway, "GET", "/analytics")
    assert analytics["allTime"]["estimatedCostUsd"] == pytest.approx(
        run.result["total_cost_usd"], abs=5.1e-5)


def test_after_a_halt_the_next_prompt_fails_at_once_and_resume_restores_it(claude, gateway, sim):
    sim.set_defaults(claim="overage")
    tripping = claude.run(gateway.port, "one")
    # The response that trips the guard is relayed in full.
    assert tripping.returncode == 0 and tripping.text == "word1 word2 word3 ", tripping.stdout
    assert admin(gateway, "GET", "/admin/resume")["halted"] is True
    reached = len(sim.requests)

    blocked = claude.run(gateway.port, "two")

    assert blocked.seconds < FAST_S
    assert blocked.returncode != 0 and blocked.result["is_error"] is True
    assert blocked.result["api_error_status"] == 503
    assert "dario halted to prevent API-rate bleed" in blocked.text
    assert "dario resume" in blocked.text
    assert len(sim.requests) == reached  # nothing got past the halt
    halted = [r for r in records(gateway, 2) if r["outcome"] == "halted"]
    assert len(halted) == 1, halted  # and the CLI did not retry it
    assert halted[0]["sessionId"] == blocked.result["session_id"]

    assert admin(gateway, "POST", "/admin/resume")["wasHalted"] is True
    sim.set_defaults(claim="five_hour")
    again = claude.run(gateway.port, "three")
    assert again.returncode == 0 and again.text == "word1 word2 word3 ", again.stdout
    assert len(sim.requests) == reached + 1


def test_claude_code_runs_its_read_tool_through_the_gateway(claude, gateway, sim):
    note = claude.work / "note.txt"
    note.write_text("the-dario-tool-loop-marker\n")
    tool = {"x-sim-tool": "Read", "x-sim-tool-input": json.dumps({"file_path": str(note)})}

    run = claude.run(gateway.port, "Read note.txt", "--allowedTools", "Read", headers=tool)

    assert run.returncode == 0 and run.result["is_error"] is False, run.stdout + run.stderr
    assert run.result["permission_denials"] == []
    assert "the-dario-tool-loop-marker" in run.text  # the simulator quoting the tool's result
    assert len(sim.requests) == 2  # the prompt, then the tool's result
    both = records(gateway, 2)
    assert [r["outcome"] for r in both] == ["ok", "ok"]
    assert {r["sessionId"] for r in both} == {run.result["session_id"]}


def test_a_wrong_dario_key_fails_at_once_and_says_how_to_send_it(claude, sim, home):
    settings = make_settings(home, sim.url, env={"DARIO_API_KEY": "secret"})
    with running_gateway(settings) as gateway:
        right = claude.run(gateway.port, "hi", headers={"x-dario-api-key": "secret"})
        assert right.returncode == 0 and right.result["is_error"] is False, right.stdout
        wrong = claude.run(gateway.port, "hi", headers={"x-dario-api-key": "wrong"})

    assert wrong.seconds < FAST_S
    assert wrong.returncode != 0 and wrong.result["api_error_status"] == 401
    assert "ANTHROPIC_CUSTOM_HEADERS" in wrong.text
    assert len(sim.requests) == 1  # only the run with the right key reached upstream
