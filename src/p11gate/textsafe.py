"""Text from clients made safe to print on one line.

A certificate subject, a SAN or a label can hold any character, a newline among them:
printed as is into a line-oriented log it starts what looks like a new record. Every
character that is not printable (control characters, line and paragraph separators,
bidirectional overrides, ...) is written as a Python-style escape instead (``\n``,
``\x1b``, ``\u2028``). The backslash itself is left alone, so text escaped twice (an
identity's description, then a log record) reads the same: these escapes keep records
whole; they are not meant to be undone (a certificate subject in RFC 4514 form already
writes a backslash of its own as ``\\``).
"""

from __future__ import annotations

import re

# Unicode categories Cc, Cf, Cs, Co, Cn, Zl, Zp are what ``str.isprintable`` refuses
# (besides the space, which is fine)
_UNSAFE = re.compile(r"[^\x20-\x7e]")


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    if ch.isprintable():
        return ch  # printable non-ASCII (é, 日本) stays readable
    o = ord(ch)
    if o <= 0xFF:
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{o:02x}")
    return f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}"


def one_line(text: str) -> str:
    """``text`` with every unprintable character escaped."""
    if text.isprintable():
        return text  # the common case, without a regex pass
    return _UNSAFE.sub(_escape, text)
