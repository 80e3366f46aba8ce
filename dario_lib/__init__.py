"""dario: a local gateway for the Anthropic API that halts on overage billing."""

__version__ = "0.1.0"
