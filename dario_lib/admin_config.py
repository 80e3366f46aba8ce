"""The gateway's own configuration over HTTP: `GET /admin/config` and `PUT /admin/config`.

The TUI's Config tab and `dario config set` act through these, so they edit and apply
the file of the gateway they talk to, whatever `$DARIO_HOME` the caller has. The
handler applies the usual Host, Origin and key checks first.

GET answers `{"path", "source", "file", "effective", "sources", "pending"}`:
- `path`: the config file this gateway reads (`$DARIO_HOME/config.json` of its process);
- `source`: what reading it now gives: "file", "missing" or "invalid";
- `file`: its JSON object as it is now (unknown keys kept, credentials masked);
- `effective`: every setting's value in force (flag > environment > file > default),
  credentials masked by `config.public_value`;
- `sources`: where each value in force comes from: flag, env, file or default;
- `pending`: settings whose new value is saved but takes effect only after a restart
  (host, port, maxRecords and the store.* keys).

PUT takes `{"set": {"overageGuard.behavior": "warn", ...}}`. Each value is validated as
`dario config set` validates it:
- a JSON string is parsed as that command parses its text (`config.parse_value`):
  "30000", "warn", "a,b" or '["ntfy", "publish", "t"]';
- any other JSON value is checked as that value by the setting's kind: 30000, true,
  ["a", "b"], {"util5h": {"halt": 0.9}};
- null removes the setting from the file, so its default applies;
- a credential given back exactly as GET shows it masked (`http://***:***@proxy:3128`)
  keeps the value it stands for instead of saving the asterisks.

All or nothing: an unknown setting or a value that is not allowed answers 400
`invalid_request_error` naming the setting, the value (never one that may hold
credentials) and what is allowed, and nothing is written. Otherwise the file is written
atomically and applied at once as SIGHUP applies it (`server.reload()`); if applying
fails, the previous file is put back and the 400 says why. A gateway that cannot reload
(`server.resolver` is None: built in-process, not by `dario proxy`) answers 409 before
writing anything. The answer is GET's shape plus `changed` (the names written) and
`overridden` (names whose saved value a flag or environment variable outranks).

Threading: any handler thread; one change at a time per process (`_EDIT_LOCK`), so two
PUTs never interleave their read-modify-write of the file.
"""

import json
import logging
import os
import threading

from . import config, wire
from .files import write_atomic

log = logging.getLogger(__name__)

# Settings the running gateway cannot change: name -> what it runs with.
RESTART = {"host": lambda server: server.settings.host, "port": lambda server: server.settings.port,
           "maxRecords": lambda server: server.settings.max_records,
           # The store a gateway keeps its halts and spend in is chosen once, at start.
           **{name: (lambda server, attr=attr: getattr(server.settings.store, attr))
              for name, attr in config.STORE_FIELDS.items()}}
_FIELD_MAPS = ((None, config.SETTING_FIELDS), ("guard", config.GUARD_FIELDS), ("store", config.STORE_FIELDS))
_EDIT_LOCK = threading.Lock()


class Unchanged:
    """A masked credential given back as GET showed it: keep what the file holds."""


UNCHANGED = Unchanged()


# -- reading ------------------------------------------------------------------------

def in_force(settings, name):
    """A setting's value in force in these Settings, in Settings form."""
    for part, fields in _FIELD_MAPS:
        if name in fields:
            holder = settings if part is None else getattr(settings, part)
            return getattr(holder, fields[name])
    raise KeyError(name)


def _json_ready(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def _masked_raw(name, value):
    """A value as found in the file, with credentials masked (invalid ones hidden)."""
    kind = config.SCHEMA_BY_NAME[name].kind
    if value is None or not hasattr(kind, "masked"):
        return value
    try:
        return kind.masked(kind.check(value))
    except (ValueError, TypeError):
        return "(hidden: not a valid value, and it may hold credentials)"


def public_file(raw):
    """The raw config object with every credential-bearing setting masked."""
    try:
        json.dumps(raw)
    except RecursionError:          # a hand-written file can nest deeper than an answer can
        return {"(not shown)": "the file nests too deeply to show"}
    out = raw
    for key in config.SCHEMA:
        if hasattr(key.kind, "masked"):
            present, value = config._lookup(raw, key.name)
            if present:
                out = _with_raw(out, key.name, _masked_raw(key.name, value))
    return out


def _with_raw(raw, name, value):
    """A copy of raw with one dotted key set to a JSON value as is (None included)."""
    out = dict(raw)
    node = out
    *parents, leaf = name.split(".")
    for part in parents:
        node[part] = dict(node[part]) if isinstance(node.get(part), dict) else {}
        node = node[part]
    node[leaf] = value
    return out


def pending(server, file_config):
    """Settings saved for a restart: the value the file (or default) gives, where no flag or
    environment variable outranks it, differs from the one the gateway runs with."""
    names = []
    for name, running in RESTART.items():
        if server.settings.sources.get(name) not in ("file", "default"):
            continue
        wanted = file_config.values.get(name, config.SCHEMA_BY_NAME[name].default)
        if wanted != running(server):
            names.append(name)
    return names


def state(server):
    """What GET /admin/config answers."""
    settings = server.settings
    file_config = config.load_file(settings.config_path)
    return {
        "path": settings.config_path,
        "source": file_config.source,
        "file": public_file(file_config.raw),
        "effective": {key.name: _json_ready(config.public_value(key.name, in_force(settings, key.name)))
                      for key in config.SCHEMA},
        "sources": {key.name: settings.sources.get(key.name, "default") for key in config.SCHEMA},
        "pending": pending(server, file_config),
    }


# -- changing -----------------------------------------------------------------------

def _quoted(kind, value):
    if getattr(kind, "secret", False):
        return "(value hidden: it may hold credentials)"
    try:
        return json.dumps(value)[:80]
    except RecursionError:
        return "(a value nested too deeply to show)"


def validate(name, value, file_config, settings):
    """The value to store for one setting (None: remove it; UNCHANGED: keep it), or
    wire.HttpError 400 naming the setting, the value and what is allowed."""
    key = config.SCHEMA_BY_NAME.get(name)
    if key is None:
        raise wire.HttpError(400, f"unknown config key {name[:100]!r}; keys: {', '.join(config.SCHEMA_BY_NAME)}")
    if value is None:
        return None
    kind = key.kind
    if isinstance(value, str) and hasattr(kind, "masked"):
        masked = [_masked_raw(name, file_config.values.get(name))]
        if settings.sources.get(name) != "file":
            masked.append(config.public_value(name, in_force(settings, name)))
        if value in masked and "***" in value:
            return UNCHANGED
    try:
        if isinstance(value, str):
            return config.parse_value(name, value)
        return kind.check(value)
    except config.ConfigError as err:
        raise wire.HttpError(400, str(err)) from None
    except (ValueError, TypeError) as err:
        raise wire.HttpError(400, f"invalid value {_quoted(kind, value)} for {name} (allowed: {err})") from None


def parse_request(request):
    """The {name: value} of a PUT body already parsed from JSON, or HttpError 400."""
    usage = 'PUT /admin/config takes {"set": {"KEY": value, ...}}, e.g. {"set": {"overageGuard.behavior": "warn"}}'
    if not isinstance(request, dict) or set(request) != {"set"} or not isinstance(request["set"], dict):
        raise wire.HttpError(400, usage)
    if not request["set"]:
        raise wire.HttpError(400, "nothing to set: " + usage)
    return request["set"]


def update(server, changes):
    """Validate, save and apply {name: JSON value}; returns the answer or raises HttpError."""
    if server.resolver is None:
        raise wire.HttpError(409, "this gateway cannot apply configuration changes (it was not started by "
                                  "`dario proxy`, so it cannot re-read its settings); nothing was written",
                             kind="invalid_request_error", headers={"x-should-retry": "false"})
    with _EDIT_LOCK:
        settings = server.settings
        path = settings.config_path
        file_config = config.load_file(path)
        values = {name: validate(name, value, file_config, settings) for name, value in changes.items()}
        if file_config.source == "invalid":
            raise wire.HttpError(409, f"not changing {path}: it is not a valid JSON object. Fix or remove it "
                                      "first; nothing was written", kind="invalid_request_error",
                                 headers={"x-should-retry": "false"})
        raw = file_config.raw
        try:
            for name, value in values.items():
                if value is not UNCHANGED:
                    raw = config.with_value(raw, name, value)
        except RecursionError:
            raise wire.HttpError(409, f"not changing {path}: it nests too deeply to rewrite; nothing was written",
                                 kind="invalid_request_error", headers={"x-should-retry": "false"}) from None
        before = _read_bytes(path)
        try:
            config.save_file(path, raw)
        except OSError as err:
            raise wire.HttpError(500, f"cannot write {path}: {err.strerror or err}; nothing was changed") from None
        try:
            restart = server.reload()
        except ValueError as err:           # ConfigError too: e.g. a CA file that cannot be loaded
            _restore(path, before)
            raise wire.HttpError(400, f"not applied: {err}. {path} was put back as it was") from None
        log.info("config changed through PUT /admin/config: %s", ", ".join(values))
        answer = state(server)
    answer["pending"] = sorted(set(answer["pending"]) | set(restart))
    answer["changed"] = list(values)
    answer["overridden"] = {name: source for name in values
                            if (source := server.settings.sources.get(name)) in ("flag", "env")}
    return answer


def _read_bytes(path):
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _restore(path, before):
    """Put the file back as it was before a change that could not be applied."""
    try:
        if before is None:
            os.unlink(path)
        else:
            write_atomic(path, before)
    except OSError as err:
        log.error("could not put %s back after a failed change: %s", path, err.strerror or err)
