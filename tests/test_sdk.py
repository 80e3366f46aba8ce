"""The official anthropic and openai SDKs as real clients of the gateway."""

import anthropic
import openai
import pytest

from .helpers import wait_until

MESSAGES = [{"role": "user", "content": "Say hi"}]


def record_of(gateway):
    """The latest record: the client may finish reading a moment before it is stored."""
    assert wait_until(lambda: gateway.store.summary()["requests"] > 0)
    return gateway.store.snapshot()[-1]


@pytest.fixture
def claude(gateway):
    client = anthropic.Anthropic(api_key="sk-ant-test", base_url=f"http://127.0.0.1:{gateway.port}",
                                 max_retries=0)
    yield client
    client.close()


@pytest.fixture
def oai(gateway):
    client = openai.OpenAI(api_key="sk-test", base_url=f"http://127.0.0.1:{gateway.port}/v1", max_retries=0)
    yield client
    client.close()


def test_anthropic_create(claude, gateway, sim):
    message = claude.messages.create(model="claude-haiku-4-5", max_tokens=32, messages=MESSAGES)
    assert message.content[0].text.startswith("word1")
    assert message.usage.output_tokens == 6
    seen = sim.requests[-1]
    assert "sk-ant-test" in (seen.header("x-api-key") or seen.header("Authorization"))
    assert record_of(gateway)["outputTokens"] == 6


def test_anthropic_stream(claude, gateway):
    with claude.messages.stream(model="claude-haiku-4-5", max_tokens=32, messages=MESSAGES,
                                extra_headers={"x-sim-events": "5"}) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "word1 word2 word3 word4 word5 "
    assert final.usage.output_tokens == 10
    record = record_of(gateway)
    assert record["stream"] is True and record["outputTokens"] == 10


def test_anthropic_count_tokens_and_models(claude):
    counted = claude.messages.count_tokens(model="claude-haiku-4-5", messages=MESSAGES)
    assert counted.input_tokens > 0
    ids = [model.id for model in claude.models.list()]
    assert "claude-sonnet-4-5" in ids
    assert claude.models.retrieve("claude-sonnet-4-5").id == "claude-sonnet-4-5"


def test_anthropic_complete_via_raw_post(claude):
    # The legacy /v1/complete has no resource in this SDK version; use its raw client.
    resp = claude.post("/v1/complete", cast_to=object,
                       body={"model": "claude-2.1", "prompt": "\n\nHuman: hi\n\nAssistant:", "max_tokens_to_sample": 8})
    assert resp["type"] == "completion"


def test_anthropic_sees_upstream_errors_as_errors(claude):
    with pytest.raises(anthropic.APIStatusError) as err:
        claude.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=MESSAGES,
                               extra_headers={"x-sim-http-status": "529"})
    assert err.value.status_code == 529


def test_openai_chat(oai, gateway):
    completion = oai.chat.completions.create(model="claude-haiku-4-5", messages=MESSAGES)
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens == 6
    record = record_of(gateway)
    assert record["api"] == "openai" and record["outputTokens"] == 6 and record["inputTokens"] > 0


def test_openai_chat_stream_with_usage(oai, gateway):
    chunks = list(oai.chat.completions.create(model="claude-haiku-4-5", messages=MESSAGES, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("word1")
    assert chunks[-1].usage.completion_tokens == 6
    record = record_of(gateway)
    assert record["stream"] is True and record["outputTokens"] == 6


def test_openai_models(oai):
    assert "claude-sonnet-4-5" in [model.id for model in oai.models.list()]
