"""JSON from outside (a request body, a history file or line): the ways `json.loads` fails on hostile input
besides a syntax error, in words.

- `RecursionError`: arrays or objects nested deeper than the interpreter's recursion limit (about 1,000
  levels; `[` 200,000 times is a 200 kB body);
- `ValueError`: an integer literal of more than `sys.get_int_max_str_digits()` digits (4,300 by default:
  Python's guard against quadratic-time integer parsing), which names neither the number nor where it is.

`loads` turns both into `JSONInputError`, whose message says what was wrong and, for a number, where it is
("n_trials: a number of 5000 digits is too long (at most 4300 digits)"). A `json.JSONDecodeError` and a
`UnicodeDecodeError` pass through as they are: their callers already word them. Standard library only, so
`converge diagnose` can import it without the web layer.
"""

from __future__ import annotations

import json
import sys
from typing import Any

TOO_DEEP = "it is nested too deeply (arrays and objects more than about 1,000 levels deep)"


class JSONInputError(ValueError):
    """JSON text that is well-formed or not, but cannot be read here; the message says why."""


def loads(text: str | bytes) -> Any:
    """`json.loads(text)`, with nesting too deep and numbers too long raised as `JSONInputError`."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except RecursionError:
        raise JSONInputError(TOO_DEEP) from None
    except ValueError:  # what else json.loads raises: int() refusing a literal over the digit limit
        raise JSONInputError(number_too_long(text)) from None


class _TooLong:
    """Stands in for an integer literal over the digit limit, so the rest of the text still parses."""

    def __init__(self, digits: int):
        self.digits = digits


def number_too_long(text: str | bytes) -> str:
    """Why `json.loads(text)` raised the ValueError of an integer literal over the digit limit: the number's
    length and, where the text parses once that number is set aside, its place ("epochs[0].train_loss")."""
    limit = sys.get_int_max_str_digits()
    found: list[int] = []

    def parse_int(literal: str) -> Any:
        digits = len(literal) - literal.startswith("-")
        if limit and digits > limit:
            found.append(digits)
            return _TooLong(digits)
        return int(literal)

    where: str | None = None
    try:
        where = _path_to_too_long(json.loads(text, parse_int=parse_int))
    except (ValueError, RecursionError):  # the text fails further on too: the number's place is not known
        pass
    if not found:
        return "a number in it is too long to read"
    what = f"a number of {found[0]} digits is too long (at most {limit} digits)"
    return f"{where}: {what}" if where else what


def _path_to_too_long(value: Any) -> str | None:
    """Where the first `_TooLong` in a decoded value is, as `a.b[0].c`; "" for the value itself, None if none."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:  # iterative, depth-first in document order
        node, path = stack.pop()
        if isinstance(node, _TooLong):
            return path
        if isinstance(node, dict):
            items = [(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()]
        elif isinstance(node, list):
            items = [(v, f"{path}[{i}]") for i, v in enumerate(node)]
        else:
            continue
        stack.extend(reversed(items))
    return None
