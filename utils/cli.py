"""Small command-line helpers shared by the runners (lengths like "4K", a help formatter, one-line user errors)."""

from __future__ import annotations

import argparse
import contextlib


def parse_length(text: str) -> int:
    """'4096', '4K' or '4k' -> 4096 tokens (an argparse `type=`)."""
    text = text.strip()
    try:
        value = float(text[:-1]) * 1024 if text[-1:] in "kK" else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096 or 4K)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"a length must be a positive whole number of tokens, got {text!r}")
    return int(value)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except None ones (their help says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


@contextlib.contextmanager
def user_errors():
    """Bad input (a ValueError or FileNotFoundError whose message names the fix) ends the run with one line,
    `error: ...`, instead of a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


__all__ = ["parse_length", "HelpFormatter", "user_errors"]
