import gzip
import json
import zlib

from hypothesis import given, settings, strategies as st

from dario_lib.metering import JSON_BUFFER_CAP, Meter


def sse(name, data):
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


ANTHROPIC_STREAM = b"".join([
    sse("message_start", {"type": "message_start", "message": {
        "id": "m", "model": "claude-opus-4-5", "usage": {
            "input_tokens": 120, "output_tokens": 1, "cache_read_input_tokens": 1000,
            "cache_creation_input_tokens": 50}}}),
    sse("content_block_start", {"type": "content_block_start", "index": 0}),
    sse("ping", {"type": "ping"}),
    *[sse("content_block_delta", {"type": "content_block_delta", "delta": {
        "type": "text_delta", "text": 'tricky "usage": {"output_tokens": 999} text'}}) for _ in range(5)],
    sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                          "usage": {"output_tokens": 42}}),
    sse("message_stop", {"type": "message_stop"}),
])
EXPECTED = {"inputTokens": 120, "outputTokens": 42, "cacheReadTokens": 1000, "cacheCreateTokens": 50}

OPENAI_STREAM = b"".join(
    [f"data: {json.dumps({'model': 'claude-sonnet-4-5', 'choices': [{'delta': {'content': 'x'}}]})}\n\n".encode()
     for _ in range(3)]
    + [f"data: {json.dumps({'model': 'claude-sonnet-4-5', 'choices': [], 'usage': {'prompt_tokens': 7, 'completion_tokens': 9}})}\n\n".encode(),
       b"data: [DONE]\n\n"])


def meter_of(body, content_type="text/event-stream", encoding="", pieces=None):
    meter = Meter(content_type, encoding)
    for piece in pieces or [body]:
        meter.feed(piece)
    meter.close()
    return meter


def test_anthropic_stream_usage_message_delta_wins():
    meter = meter_of(ANTHROPIC_STREAM)
    assert meter.usage == EXPECTED
    assert meter.model == "claude-opus-4-5"


def test_openai_stream_final_chunk_usage():
    meter = meter_of(OPENAI_STREAM)
    assert meter.usage["inputTokens"] == 7 and meter.usage["outputTokens"] == 9
    assert meter.model == "claude-sonnet-4-5"


def test_crlf_and_cr_line_endings():
    assert meter_of(ANTHROPIC_STREAM.replace(b"\n", b"\r\n")).usage == EXPECTED
    assert meter_of(ANTHROPIC_STREAM.replace(b"\n", b"\r")).usage == EXPECTED


def test_stream_cut_after_message_start_keeps_reported_usage():
    cut = ANTHROPIC_STREAM[:ANTHROPIC_STREAM.index(b"event: content_block_start")]
    meter = meter_of(cut)
    assert meter.usage["inputTokens"] == 120 and meter.usage["outputTokens"] == 1


def test_error_event_is_noticed():
    body = sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    assert meter_of(body).error_type == "overloaded_error"


def test_json_bodies_anthropic_and_openai():
    anthropic = json.dumps({"model": "claude-haiku-4-5", "usage": {
        "input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 5,
        "cache_creation_input_tokens": 6}}).encode()
    meter = meter_of(anthropic, "application/json")
    assert meter.usage == {"inputTokens": 3, "outputTokens": 4, "cacheReadTokens": 5, "cacheCreateTokens": 6}
    openai = json.dumps({"model": "m", "usage": {"prompt_tokens": 11, "completion_tokens": 12}}).encode()
    assert meter_of(openai, "application/json").usage["outputTokens"] == 12


def test_gzip_and_deflate_bodies():
    assert meter_of(gzip.compress(ANTHROPIC_STREAM), encoding="gzip").usage == EXPECTED
    assert meter_of(zlib.compress(ANTHROPIC_STREAM), encoding="deflate").usage == EXPECTED
    raw_deflate = zlib.compressobj(wbits=-15)
    body = raw_deflate.compress(ANTHROPIC_STREAM) + raw_deflate.flush()
    assert meter_of(body, encoding="deflate").usage == EXPECTED


def test_gzip_stream_fed_in_small_pieces():
    body = gzip.compress(ANTHROPIC_STREAM)
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
    assert meter_of(body, encoding="gzip", pieces=pieces).usage == EXPECTED


def test_unknown_encoding_meters_nothing_and_garbage_never_raises():
    assert meter_of(ANTHROPIC_STREAM, encoding="br").usage["inputTokens"] == 0
    assert meter_of(b"\x00\xff garbage \n\n data: {nope\n\n").usage["inputTokens"] == 0
    assert meter_of(b"not gzip at all", encoding="gzip").usage["inputTokens"] == 0


def test_large_json_body_is_not_held_whole():
    text = "x" * (JSON_BUFFER_CAP * 2)
    body = json.dumps({"model": "claude-sonnet-4-5", "content": [{"text": text}],
                       "usage": {"input_tokens": 8, "output_tokens": 9}}).encode()
    meter = Meter("application/json")
    for i in range(0, len(body), 65536):
        meter.feed(body[i:i + 65536])
        assert len(meter._body) <= JSON_BUFFER_CAP + 65536
    meter.close()
    assert meter.usage["inputTokens"] == 8 and meter.usage["outputTokens"] == 9
    assert meter.model == "claude-sonnet-4-5"


def test_overlong_sse_line_is_skipped_not_buffered():
    huge = b"data: " + b"y" * (3 * 1024 * 1024) + b"\n\n"
    meter = Meter("text/event-stream")
    for i in range(0, len(huge), 65536):
        meter.feed(huge[i:i + 65536])
        assert len(meter._pending) <= 1024 * 1024 + 65536
    meter.feed(ANTHROPIC_STREAM)
    meter.close()
    assert meter.usage == EXPECTED


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_chunk_split_gives_the_same_totals(data):
    body = data.draw(st.sampled_from([ANTHROPIC_STREAM, ANTHROPIC_STREAM.replace(b"\n", b"\r\n"),
                                      OPENAI_STREAM]))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=30)))
    pieces = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
    assert meter_of(body, pieces=pieces).usage == meter_of(body).usage


# -- bounds: metering gives up on hostile bodies, never holds them ---------------------

def test_an_endless_sse_event_is_skipped_without_being_held():
    meter = Meter("text/event-stream")
    line = b"data: " + b"x" * 1000 + b"\n"
    for _ in range(20_000):                          # 20 MB of data lines, no blank line
        meter.feed(line)
        assert sum(len(part) for part in meter._data) <= 1024 * 1024
    meter.feed(b"\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\n")
    meter.close()
    assert meter.usage["outputTokens"] == 7 and meter.final


def test_a_gzip_bomb_is_metered_only_up_to_a_bound():
    import gzip
    import time
    bomb = gzip.compress(b"data: " + b"0" * (200 * 1024 * 1024), 9)
    meter = Meter("text/event-stream", "gzip")
    began = time.monotonic()
    for start in range(0, len(bomb), 16384):
        meter.feed(bomb[start:start + 16384])
    meter.close()
    assert meter.gave_up and not meter.final
    assert time.monotonic() - began < 3


def test_usage_is_final_only_from_the_final_report():
    meter = Meter("text/event-stream")
    meter.feed(b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
               b'{"input_tokens":5,"output_tokens":1}}}\n\n')
    meter.close()
    assert meter.reported and not meter.final
    meter = Meter("application/json")
    meter.feed(b'{"type": "message"}')
    meter.close()
    assert not meter.reported and not meter.final
    meter = Meter("application/json", "br")
    meter.feed(b"\x1b\x0f\x00")
    meter.close()
    assert meter.gave_up and not meter.final
