"""The simulator's tool loop and its --help, over real sockets and a real process."""

import json
import subprocess
import sys

import pytest
import requests

from dario_lib import simulator

from .claude_kit import REPO
from .helpers import sse_events

READ = {"x-sim-tool": "Read", "x-sim-tool-input": '{"file_path": "/tmp/a b.txt", "limit": 2}'}
READ_INPUT = {"file_path": "/tmp/a b.txt", "limit": 2}
# A user turn as Claude Code sends it: text blocks, then a trailing "system" message.
USER_TURN = [
    {"role": "user", "content": [{"type": "text", "text": "<system-reminder>x</system-reminder>"},
                                 {"type": "text", "text": "read the file"}]},
    {"role": "system", "content": "per-turn instructions"},
]


def post(sim, messages, headers=None, stream=False):
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": messages,
            "stream": stream}
    return requests.post(f"{sim.url}/v1/messages", json=body, headers=headers or {}, timeout=5)


def with_result(content):
    return USER_TURN + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_sim_1",
                                           "name": "Read", "input": READ_INPUT}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_sim_1",
                                      "content": content}]},
    ]


def test_the_tool_headers_answer_a_user_turn_with_a_tool_call(sim):
    message = post(sim, USER_TURN, READ).json()

    assert message["stop_reason"] == "tool_use"
    [block] = message["content"]
    assert block["type"] == "tool_use" and block["name"] == "Read"
    assert block["id"].startswith("toolu_") and block["input"] == READ_INPUT


def test_a_streamed_tool_call_has_the_api_event_sequence(sim):
    resp = post(sim, USER_TURN, dict(READ, **{"x-sim-events": "4"}), stream=True)
    events = sse_events(resp.text)

    names = [name for name, _ in events]
    assert names == ["message_start", "content_block_start", "ping"] + \
        ["content_block_delta"] * 4 + ["content_block_stop", "message_delta", "message_stop"]
    start = events[1][1]["content_block"]
    assert (start["type"], start["name"], start["input"]) == ("tool_use", "Read", {})
    assert start["id"].startswith("toolu_")
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert {delta["type"] for delta in deltas} == {"input_json_delta"}
    assert json.loads("".join(delta["partial_json"] for delta in deltas)) == READ_INPUT
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize("content", [
    "A" * 150 + "B" * 50 + "C" * 100,
    [{"type": "text", "text": "A" * 150}, {"type": "image", "source": {}},
     {"type": "text", "text": "B" * 50 + "C" * 100}],
], ids=["string", "blocks"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_tool_result_is_answered_with_text_quoting_its_first_200_characters(
        sim, content, stream):
    resp = post(sim, with_result(content), READ, stream=stream)

    if stream:
        events = sse_events(resp.text)
        text = "".join(data["delta"]["text"] for name, data in events
                       if name == "content_block_delta")
        assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    else:
        message = resp.json()
        assert message["stop_reason"] == "end_turn"
        [block] = message["content"]
        text = block["text"]
    assert text.endswith("A" * 150 + "B" * 50)  # the first 200 characters, and no more
    assert "C" not in text


def test_tool_knobs_work_server_wide_and_only_on_a_user_turn(sim):
    sim.set_defaults(tool="Bash", tool_input={"command": "ls"})
    [block] = post(sim, USER_TURN).json()["content"]
    assert (block["type"], block["input"]) == ("tool_use", {"command": "ls"})

    prefill = USER_TURN + [{"role": "assistant", "content": "Sure"}]
    assert post(sim, prefill).json()["content"] == [{"type": "text", "text": "word1 word2 word3 "}]
    sim.reset()
    assert post(sim, USER_TURN).json()["content"][0]["type"] == "text"


def test_a_tool_input_that_is_not_a_json_object_is_refused(sim):
    resp = post(sim, USER_TURN, {"x-sim-tool": "Read", "x-sim-tool-input": "[1]"})
    assert resp.status_code == 400 and "tool_input" in resp.json()["error"]["message"]
    with pytest.raises(ValueError, match="tool_input"):
        sim.set_defaults(tool_input="not json")


def test_help_documents_every_knob_the_tool_headers_and_the_control_endpoints():
    proc = subprocess.run([sys.executable, "-m", "dario_lib.simulator", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=30)

    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name, default, meaning in simulator.KNOBS:
        header = "x-sim-" + name.replace("_", "-")
        [at] = [k for k, text in enumerate(lines) if text.split()[:1] == [header]]
        assert f"knob {name}, default {json.dumps(default)}" in lines[at]
        assert lines[at + 1].strip() == meaning
    for text in ("x-sim-tool: NAME", "x-sim-tool-input", "tool_result", "ANTHROPIC_CUSTOM_HEADERS",
                 "POST /_sim/defaults", "POST /_sim/reset", "GET  /_sim/requests",
                 "GET  /_sim/disconnects", "SIMULATOR_URL"):
        assert text in proc.stdout
