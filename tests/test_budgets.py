"""Budgets without sockets: the ledger's trust rules, max_tokens limits, worst cases."""

import json
import math
import os

import pytest
from hypothesis import given, strategies as st

from dario_lib import budgets
from dario_lib.budgets import BadRequest, Ledger, LedgerError, max_tokens_of, worst_case_usd


# -- the ledger --------------------------------------------------------------------

def ledger(tmp_path, text):
    path = tmp_path / "spend-ledger.jsonl"
    path.write_text(text)
    return Ledger(str(path))


def test_good_entries_load_and_a_torn_last_line_is_skipped(tmp_path):
    text = ('{"t": 1, "account": "key:aaaaaaaa", "usd": 0.25}\n'
            '{"t": 2, "account": "me", "usd": 0}\n'
            '{"t": 3, "account": "me", "usd": 0.5, "extra": true}\n{"t": 4, "acc')
    assert ledger(tmp_path, text).entries() == [(1, "key:aaaaaaaa", 0.25, False), (2, "me", 0.0, False),
                                                (3, "me", 0.5, True)]
    assert ledger(tmp_path, text).load() == [(1, "key:aaaaaaaa", 0.25), (2, "me", 0.0), (3, "me", 0.5)]


@pytest.mark.parametrize("entry", [
    '{"t": 1, "account": "a", "usd": NaN}',
    '{"t": 1, "account": "a", "usd": Infinity}',
    '{"t": 1, "account": "a", "usd": -Infinity}',
    '{"t": 1, "account": "a", "usd": "nan"}',
    '{"t": 1, "account": "a", "usd": "0.5"}',
    '{"t": 1, "account": "a", "usd": -1e6}',
    '{"t": 1, "account": "a", "usd": -0.01}',
    '{"t": 1, "account": "a", "usd": 1e10}',
    '{"t": 1, "account": "a", "usd": true}',
    '{"t": 1, "account": "a", "usd": null}',
    '{"t": 1, "account": "a"}',
    '{"t": 1.5, "account": "a", "usd": 1}',
    '{"t": "1", "account": "a", "usd": 1}',
    '{"t": false, "account": "a", "usd": 1}',
    '{"t": -1, "account": "a", "usd": 1}',
    '{"t": 253402300800000, "account": "a", "usd": 1}',
    '{"t": 1, "account": "", "usd": 1}',
    '{"t": 1, "account": 7, "usd": 1}',
    '{"t": 1, "account": "' + "x" * 201 + '", "usd": 1}',
    '{"t": 1, "account": "a", "usd": 1, "extra": 1}',
    '{"t": 1, "account": "a", "usd": 1, "extra": "true"}',
    '{"t": 1, "account": "a", "usd": 1, "extra": null}',
    '[1, "a", 1]',
    '"text"',
    'not json',
])
def test_an_entry_that_cannot_be_trusted_is_a_ledger_error(tmp_path, entry):
    with pytest.raises(LedgerError, match="line 2 is not a ledger entry"):
        ledger(tmp_path, '{"t": 1, "account": "a", "usd": 1}\n' + entry + "\n").load()


def test_append_and_compaction_never_write_a_bad_value(tmp_path):
    book = Ledger(str(tmp_path / "spend-ledger.jsonl"))
    for bad in (float("nan"), float("inf"), -1.0, 2e9):
        with pytest.raises(LedgerError):
            book.append(1, "a", bad)
        with pytest.raises(LedgerError):
            book.rewrite([(1, "a", bad)])
    assert not (tmp_path / "spend-ledger.jsonl").exists()
    book.append(1, "a", 0.5)
    book.append(2, "a", 0.25, extra=True)
    assert book.entries() == [(1, "a", 0.5, False), (2, "a", 0.25, True)]
    book.rewrite(book.entries())
    assert '"extra": true' in (tmp_path / "spend-ledger.jsonl").read_text().splitlines()[1]
    assert book.entries() == [(1, "a", 0.5, False), (2, "a", 0.25, True)]


def test_a_symlinked_ledger_is_neither_read_nor_appended_through(tmp_path):
    target = tmp_path / "target.jsonl"
    target.write_text('{"t": 1, "account": "a", "usd": 1}\n')
    link = tmp_path / "spend-ledger.jsonl"
    link.symlink_to(target)
    book = Ledger(str(link))
    with pytest.raises(LedgerError, match="symlink"):
        book.load()
    with pytest.raises(LedgerError, match="symlink"):
        book.append(2, "a", 1.0)
    assert target.read_text() == '{"t": 1, "account": "a", "usd": 1}\n'


def test_a_fifo_ledger_is_refused_without_waiting(tmp_path):
    path = tmp_path / "spend-ledger.jsonl"
    os.mkfifo(path)
    with pytest.raises(LedgerError, match="not a regular file"):
        Ledger(str(path)).load()


def test_a_cost_that_is_not_a_number_charges_the_reservation(tmp_path):
    from dario_lib.config import Budget

    class Guard:
        extra_usage_cap = None

        def cross(self, *args, **kwargs):
            return None

    book = Ledger(str(tmp_path / "spend-ledger.jsonl"))
    spend = budgets.Budgets([Budget("*", 100.0, "1d", 86_400_000)], book, Guard())
    worst = worst_case_usd("claude-opus-4-5", 100, 1000)
    reservation = spend.reserve("a", worst)
    spend.settle(reservation, "a", float("nan"), {})
    assert spend.status()[0]["spentUsd"] == pytest.approx(worst)
    assert [usd for _, _, usd in book.load()] == [pytest.approx(worst)]


# -- max_tokens ----------------------------------------------------------------------

@pytest.mark.parametrize("value", [10_000_001, 10 ** 400, -1, 1.5, 1e400, float("nan")])
def test_an_absurd_max_tokens_is_a_bad_request(value):
    with pytest.raises(BadRequest, match="must be an integer from 0 to 10000000"):
        max_tokens_of(b"", {"max_tokens": value})


@pytest.mark.parametrize("key", budgets.MAX_TOKEN_KEYS)
@pytest.mark.parametrize("text", [b"1" * 400, b"10000001", b"99999999999", b"-5", b"1.5", b"1e400", b"1e", b"1-2"])
def test_the_text_path_sees_the_whole_number(key, text):
    body = b'{"model": "m", "' + key.encode() + b'": ' + text + b', "messages": []}'
    with pytest.raises(BadRequest) as err:
        max_tokens_of(body)
    assert err.value.message == f"{key} must be an integer from 0 to 10000000"
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("body, parsed, expected", [
    (b'{"max_tokens": 100}', None, 100),
    (b'{"max_tokens": 10000000}', None, 10_000_000),
    (b'{"max_tokens": 100.0}', None, 100),
    (b'{"max_tokens": 1e3}', None, 1000),
    (b'{"max_tokens": 5, "max_completion_tokens": 900}', None, 900),       # the larger counts
    (b'{"messages": []}', None, budgets.DEFAULT_MAX_TOKENS),
    (b"", {"max_tokens": 100}, 100),
    (b"", {"max_tokens": 100.0}, 100),
    (b"", {"max_tokens": 5, "max_completion_tokens": 900}, 900),
    (b"", {"max_tokens": "100"}, budgets.DEFAULT_MAX_TOKENS),     # not a number: the upstream refuses it
    (b"", {"max_tokens": True}, budgets.DEFAULT_MAX_TOKENS),
    (b"", {}, budgets.DEFAULT_MAX_TOKENS),
])
def test_max_tokens_in_range(body, parsed, expected):
    assert max_tokens_of(body, parsed) == expected


def test_parsed_and_text_paths_agree_on_a_real_body():
    body = json.dumps({"model": "claude-opus-4-5", "max_tokens": 4096, "messages": []}).encode()
    assert max_tokens_of(body, json.loads(body)) == max_tokens_of(body) == 4096


NUMBERS = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=5),
                   st.integers(min_value=-10 ** 500, max_value=10 ** 500))


@given(st.one_of(st.none(), st.integers(), st.text(max_size=50)), NUMBERS, NUMBERS)
def test_worst_case_never_raises_and_is_finite(model, body_len, max_tokens):
    usd = worst_case_usd(model, body_len, max_tokens)
    assert math.isfinite(usd) and usd >= 0
