"""Token usage read from response bodies as they stream past, without holding them.

A `Meter` is fed every chunk the gateway relays (`feed`) and told when the body ends
(`close`). It understands:

- Anthropic SSE (`message_start` usage, then `message_delta` usage, which wins),
- OpenAI SSE (`data:` chunks; the final chunk carries `usage`),
- plain JSON bodies of either API (`usage.input_tokens` ... / `prompt_tokens` ...),
- gzip or deflate content encodings (decompressed incrementally, output bounded).

Streams are parsed line by line; only events that can carry usage or the model are
decoded. A JSON body is buffered up to `JSON_BUFFER_CAP`; past that only its head and
tail are kept (usage sits at the end of a message) and read with a pattern instead.

Metering is bounded, never the relay: an event larger than `MAX_EVENT` is skipped, and
a compressed body stops being metered once `MAX_DECODED` bytes came out of it. After
`close()`, `final` says whether the body's final usage report was read (a JSON body's
`usage`, a stream's `message_delta` usage or OpenAI's usage chunk) and `reported`
whether any usage was; the relay charges a worst-case estimate when a billed answer
has no final usage, so an unreadable answer is never counted as free.

One Meter belongs to one request thread; it is not thread-safe and needs not be.
"""

import json
import re
import zlib

JSON_BUFFER_CAP = 2 * 1024 * 1024
MAX_LINE = 1024 * 1024       # an SSE line longer than this is skipped, not buffered
MAX_EVENT = 1024 * 1024      # an SSE event with more data than this is skipped
INFLATE_STEP = 256 * 1024    # bound on decompressed bytes produced per step
MAX_DECODED = 16 * 1024 * 1024   # a compressed body is metered up to this many decoded bytes

_FINAL_FIELDS = ("output_tokens", "completion_tokens")
_USAGE_FIELDS = {
    "input_tokens": "inputTokens",
    "output_tokens": "outputTokens",
    "cache_read_input_tokens": "cacheReadTokens",
    "cache_creation_input_tokens": "cacheCreateTokens",
    "prompt_tokens": "inputTokens",
    "completion_tokens": "outputTokens",
}
_TAIL_USAGE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})')
_HEAD_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')


def _tokens(value):
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class Meter:
    """Incremental usage reader for one response body."""

    def __init__(self, content_type="", content_encoding=""):
        self.usage = {"inputTokens": 0, "outputTokens": 0, "cacheReadTokens": 0, "cacheCreateTokens": 0}
        self.model = None
        self.error_type = None      # an SSE `error` event's error.type, if one arrived
        self.final = False          # the final usage report was read
        self.reported = False       # some usage report was read
        self.gave_up = False        # part of the body could not be metered
        self.is_stream = "text/event-stream" in (content_type or "").lower()
        encoding = (content_encoding or "").strip(" \t").lower()
        self._decoded = 0
        if encoding in ("gzip", "x-gzip", "deflate"):
            # 47 = auto-detect gzip or zlib headers; raw deflate is retried below.
            self._inflater = zlib.decompressobj(47)
            self._raw_deflate = encoding == "deflate"
        elif encoding in ("", "identity"):
            self._inflater = None
        else:
            self._inflater = False          # an encoding we cannot read: meter nothing
            self.gave_up = True
        self._pending = b""                 # SSE: bytes of an unfinished line
        self._skipping_line = False
        self._event = None
        self._data = []
        self._data_size = 0
        self._skipping_event = False
        self._body = bytearray()            # JSON: buffered body (or its head)
        self._tail = b""
        self._overflow = False
        self._broken = False

    # -- input -------------------------------------------------------------------

    def feed(self, chunk):
        if self._broken or self._inflater is False or not chunk:
            return
        if self._inflater is None:
            self._consume(chunk)
            return
        try:
            data = self._inflater.decompress(chunk, INFLATE_STEP)
            while True:
                self._decoded += len(data)
                if self._decoded > MAX_DECODED:
                    self._broken = self.gave_up = True      # a decompression bomb, or close to one
                    return
                self._consume(data)
                tail = self._inflater.unconsumed_tail
                if not tail:
                    break
                data = self._inflater.decompress(tail, INFLATE_STEP)
        except zlib.error:
            if self._raw_deflate and not self._decoded:
                # Some servers send raw deflate despite the name; retry once that way.
                self._raw_deflate = False
                self._inflater = zlib.decompressobj(-15)
                self.feed(chunk)
            else:
                self._broken = self.gave_up = True

    def close(self):
        """The body ended: flush what is pending and settle the numbers."""
        if self.is_stream:
            if self._pending:
                self._line(self._pending.rstrip(b"\r"))
                self._pending = b""
            self._dispatch()
        else:
            self._finish_json()

    def _consume(self, data):
        if not data:
            return
        if self.is_stream:
            self._consume_sse(data)
        elif not self._overflow:
            self._body += data
            if len(self._body) > JSON_BUFFER_CAP:
                self._overflow = True
                self._tail = bytes(self._body[-65536:])
                del self._body[65536:]
        else:
            self._tail = (self._tail + data)[-65536:]

    # -- SSE ---------------------------------------------------------------------

    def _consume_sse(self, data):
        buf = self._pending + data if self._pending else data
        start = 0
        size = len(buf)
        while start < size:
            nl = buf.find(b"\n", start)
            cr = buf.find(b"\r", start, nl if nl >= 0 else size)
            if cr >= 0:
                end = cr
                if cr + 1 == size:
                    break                       # a CR at the end may be half of CRLF
                nxt = cr + 2 if buf[cr + 1:cr + 2] == b"\n" else cr + 1
            elif nl >= 0:
                end, nxt = nl, nl + 1
            else:
                break
            if self._skipping_line:
                self._skipping_line = False
            else:
                self._line(buf[start:end])
            start = nxt
        rest = buf[start:]
        if len(rest) > MAX_LINE:
            self._skipping_line = True
            rest = b""
        self._pending = rest

    def _line(self, line):
        if not line:
            self._dispatch()
        elif line.startswith(b"data:"):
            if self._skipping_event:
                return
            data = line[6:] if line[5:6] == b" " else line[5:]
            self._data_size += len(data)
            if self._data_size > MAX_EVENT:
                self._skipping_event = True     # a hostile event: never buffered whole
                self._data = []
                return
            self._data.append(data)
        elif line.startswith(b"event:"):
            self._event = line[6:].strip()

    def _dispatch(self):
        event, data = self._event, self._data
        self._event, self._data, self._data_size = None, [], 0
        self._skipping_event = False
        if not data:
            return
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        if event is not None:
            # Anthropic: only these events carry usage, the model, or an error.
            if event not in (b"message_start", b"message_delta", b"error"):
                return
        elif b'"usage"' not in payload and (self.model is not None or b'"model"' not in payload):
            return                              # OpenAI chunk with nothing we need
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):   # nesting deeper than the parser can go
            return
        if not isinstance(obj, dict):
            return
        if event == b"error":
            err = obj.get("error")
            if isinstance(err, dict) and isinstance(err.get("type"), str):
                self.error_type = err["type"][:64]
            return
        message = obj.get("message") if event == b"message_start" else obj
        if not isinstance(message, dict):
            return
        self._take_model(message.get("model"))
        # message_start's usage is a first report; message_delta's (or OpenAI's) is final.
        self._take_usage(message.get("usage"), final=event != b"message_start")

    # -- JSON --------------------------------------------------------------------

    def _finish_json(self):
        if not self._body:
            return
        if not self._overflow:
            try:
                obj = json.loads(self._body)
            except (ValueError, RecursionError):   # nesting deeper than the parser can go
                obj = None
            if isinstance(obj, dict):
                self._take_model(obj.get("model"))
                self._take_usage(obj.get("usage"), final=True)
            self._body = bytearray()
            return
        found = _HEAD_MODEL.search(self._body)
        if found:
            self._take_model(found.group(1).decode("utf-8", "replace"))
        matches = _TAIL_USAGE.findall(self._tail)
        if matches:
            try:
                self._take_usage(json.loads(matches[-1]), final=True)
            except (ValueError, RecursionError):   # nesting deeper than the parser can go
                pass
        self._body = bytearray()

    # -- shared ------------------------------------------------------------------

    def _take_model(self, model):
        if isinstance(model, str) and model:
            self.model = model[:200]

    def _take_usage(self, usage, final=False):
        if not isinstance(usage, dict):
            return
        seen = False
        for key, value in usage.items():
            field = _USAGE_FIELDS.get(key)
            count = _tokens(value)
            if field is not None and count is not None:
                self.usage[field] = count
                seen = True
        if seen:
            self.reported = True
            if final and any(_tokens(usage.get(key)) is not None for key in _FINAL_FIELDS):
                self.final = True
