"""HTTP/1.1 message heads: a small header container and a strict, fast head parser.

The stdlib reads request headers through `email.parser`, which costs more CPU than the
rest of a forwarded request's own work; a gateway only needs name/value pairs. So the
head is read line by line here, and it is strict where leniency enables request
smuggling or header injection:

- a header name must be an RFC 9110 token (no spaces, no colon inside) or it is a 400;
- an obsolete folded continuation line drops the header it continues (it never reaches
  upstream half-joined), and refuses the message if that header frames the body;
- at most `MAX_HEADERS` lines of at most `MAX_LINE` bytes (431 beyond).

Values are decoded as ISO-8859-1, so every byte survives a round trip unchanged.
Pure functions and per-request objects: safe from any thread.
"""

import re

MAX_LINE = 65536
MAX_HEADERS = 100
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb"[\x00-\x20\x7f]")


class HeadError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class Headers:
    """Ordered (name, value) pairs with case-insensitive lookup; duplicates kept."""

    __slots__ = ("_items", "_index")

    def __init__(self, items=()):
        self._items = []
        self._index = {}
        for name, value in items:
            self.add(name, value)

    def add(self, name, value):
        self._items.append((name, value))
        # Only ASCII names are folded: str.lower() turns some other letters into ASCII
        # ones (KELVIN SIGN into k), which would let a foreign name pass for a known one.
        self._index.setdefault(name.lower() if name.isascii() else name, []).append(value)

    def get(self, name, default=None):
        values = self._index.get(name.lower())
        return values[0] if values else default

    def get_all(self, name, default=None):
        values = self._index.get(name.lower())
        return list(values) if values else default

    def values(self, name):
        """Every value of a header (a lowercase name): the list itself, not to be changed."""
        return self._index.get(name, ())

    def items(self):
        return list(self._items)

    def by_name(self):
        """(lowercased name, [values in order]) pairs: a read-only view, no copy."""
        return self._index.items()

    def keys(self):
        return [name for name, _ in self._items]

    def __getitem__(self, name):
        return self.get(name)

    def __contains__(self, name):
        return name.lower() in self._index

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self._items)


def read_headers(rfile, charge=None, step=8192, pending=0):
    """Read header lines up to the blank line; returns Headers. Raises HeadError.

    `charge(n)` is called as the head grows, every `step` bytes and once at the end with
    the rest (`pending`: bytes already read and not charged, the request line); it raises
    HeadError when the gateway's total of request heads in flight would pass its bound.
    """
    pairs, folded = [], set()
    while True:
        line = rfile.readline(MAX_LINE + 1)
        pending += len(line)
        if pending >= step and charge is not None:
            charge(pending)
            pending = 0
        if len(line) > MAX_LINE:
            raise HeadError(431, "a request header line is too long")
        if not line.endswith(b"\n"):
            raise HeadError(400, "the connection closed inside the request headers")
        if line == b"\r\n" or line == b"\n":
            break
        if len(pairs) >= MAX_HEADERS:
            raise HeadError(431, f"more than {MAX_HEADERS} request headers")
        if line[:1] in (b" ", b"\t"):
            if not pairs:
                raise HeadError(400, "a request header line starts with whitespace")
            folded.add(pairs[-1][0].lower())       # obsolete folding: drop that header
            continue
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HeadError(400, "malformed request header line")
        value = value[:-2] if value.endswith(b"\r\n") else value[:-1]
        pairs.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    if pending and charge is not None:
        charge(pending)
    if folded:
        if folded & {"content-length", "transfer-encoding"}:
            # Dropping one would change where the body ends: refuse the whole message.
            raise HeadError(400, "obsolete line folding in a body framing header")
        pairs = [(n, v) for n, v in pairs if n.lower() not in folded]
    return Headers(pairs)


def parse_request_line(raw):
    """(method, target, version) from the raw request line. Raises HeadError."""
    line = raw.rstrip(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise HeadError(400, "malformed request line")
    method, target, version = parts
    if _CONTROL.search(target):
        raise HeadError(400, "the request target has control characters")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise HeadError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise HeadError(400, "malformed request line")
    return method.decode("ascii"), target.decode("latin-1"), version.decode("ascii")
