"""Text bound for the operator's terminal or the runner's log, made inert: the one place.

Text from a pipeline or a stage (script names, URLs, file names a stage left,
error messages, results) may hold what a terminal acts on rather than prints:
OSC 52 writes the clipboard, OSC 0 sets the title, CSI clears the screen or
moves the cursor, a carriage return and erase-line rewrite a line into a fake
`done:`, bidi overrides reorder what is read. `shown` writes every such
character as a visible escape. The CLI passes every line it prints through
it (`runner.cli`, and a logging formatter for the runner's log records);
`json_shown` does the same for JSON it prints (predict's results). This
module imports nothing heavy, so the CLI can use it before anything else.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

# Enough for any message the runner prints; `shown` cuts at its limit.
TERMINAL_MAX = 1 << 20


# What a terminal would act on rather than print: C0/C1 controls (ESC starts
# escape sequences: colours, clipboard writes (OSC 52), screen clears), DEL,
# and the invisible format characters that reorder or hide text (bidi
# overrides, zero-width characters, line/paragraph separators, and the tag
# characters U+E0000..E007F that carry text no terminal shows). This is every
# character of Unicode categories Cc, Cf, Zl and Zp (a test holds it to
# `unicodedata`), listed so that nothing is computed at import.
_UNSHOWABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891"
                         "\u08e2\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb"
                         "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
                         "\U0001d173-\U0001d17a\U000e0000-\U000e007f]")


def _escaped(ch: str) -> str:
    return ch.encode("unicode_escape").decode("ascii")


def shown(text: str, limit: int) -> str:
    """Text from a stage made safe to print on the operator's terminal: at most
    `limit` characters, newlines and tabs kept, every other control or format
    character written as a visible escape (\\x1b, \\u202e, \\U000e0041)."""
    return _UNSHOWABLE.sub(lambda m: _escaped(m.group()), text[:limit])


# Lone surrogates cannot be printed as UTF-8 at all; escaped, they stay valid JSON.
_JSON_UNSHOWABLE = re.compile(f"{_UNSHOWABLE.pattern}|[\ud800-\udfff]")


def _json_escape(ch: str) -> str:
    """One character as JSON escapes: a surrogate pair past the BMP, as JSON spells those."""
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xd800 + (code >> 10):04x}\\u{0xdc00 + (code & 0x3ff):04x}"


def json_shown(value: Any, indent: int | None = 2) -> str:
    """`value` (from a stage) as JSON safe to print on the operator's terminal.

    Unlike `shown`, nothing is cut and the text stays exact JSON: what
    `json.loads` reads back is `value` itself. Control and format characters
    become JSON escapes (\\u001b, \\u202e, \\udb40\\udc41), which a terminal
    prints as text; other non-ASCII text (labels in Chinese, accents) is kept
    readable, as `ensure_ascii=True` would not."""
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    return _JSON_UNSHOWABLE.sub(lambda m: _json_escape(m.group()), text)


def inert(text: object) -> str:
    """`text` for the terminal: every control and format character escaped, nothing cut short
    of TERMINAL_MAX (newlines and tabs kept: messages may be several lines)."""
    return shown(str(text), TERMINAL_MAX)


class InertFormatter(logging.Formatter):
    """A logging formatter whose output is inert: a log record's arguments (a file name a stage
    chose, say) reach the terminal only through `shown`, whoever logged them."""

    def format(self, record: logging.LogRecord) -> str:
        return inert(super().format(record))
