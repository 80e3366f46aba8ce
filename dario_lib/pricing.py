"""Estimated cost of a request from its metered tokens: one dated price table.

Prices are list prices in USD per million tokens as published by Anthropic; cache
writes are the 5-minute cache-write rate. A model no row matches is priced at the most
expensive known rate and flagged, so an estimate errs high, never low.
"""

import re

PRICES_AS_OF = "2026-11-01"

# (pattern on the model id, input, output, cache write, cache read), first match wins.
_TABLE = (
    (r"opus-4-[5-9]|opus-[5-9]", 5.00, 25.00, 6.25, 0.50),
    (r"opus", 15.00, 75.00, 18.75, 1.50),
    (r"sonnet", 3.00, 15.00, 3.75, 0.30),
    (r"haiku-4|haiku-[5-9]", 1.00, 5.00, 1.25, 0.10),
    (r"3-5-haiku|haiku-3-5", 0.80, 4.00, 1.00, 0.08),
    (r"haiku", 0.25, 1.25, 0.30, 0.03),
)
_ROWS = tuple((re.compile(pattern), prices) for pattern, *prices in _TABLE)
_MOST_EXPENSIVE = max((prices for _, prices in _ROWS), key=lambda p: p[1])


def rates(model):
    """(input, output, cache write, cache read) USD per MTok, and whether the model is known."""
    if model:
        lowered = model.lower()
        for pattern, prices in _ROWS:
            if pattern.search(lowered):
                return prices, True
    return _MOST_EXPENSIVE, False


def estimate(model, input_tokens=0, output_tokens=0, cache_read=0, cache_create=0):
    """(USD, known) for one request's usage."""
    (p_in, p_out, p_write, p_read), known = rates(model)
    usd = (input_tokens * p_in + output_tokens * p_out
           + cache_create * p_write + cache_read * p_read) / 1_000_000
    return usd, known
