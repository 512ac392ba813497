"""Log sequence numbers: PostgreSQL's `X/Y` text form to and from a 64-bit integer."""

from __future__ import annotations

import re

from outbox.errors import ConfigurationError

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
MAX_LSN = 2**64 - 1


def parse_lsn(text: str) -> int:
    """`"16/B374D848"` -> 0x16B374D848; raises ConfigurationError on anything else."""
    match = _LSN.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ConfigurationError(f"{text!r} is not a log sequence number like '16/B374D848'")
    return (int(match[1], 16) << 32) | int(match[2], 16)


def format_lsn(lsn: int) -> str:
    """0x16B374D848 -> `"16/B374D848"`, the form PostgreSQL prints and accepts."""
    if not 0 <= lsn <= MAX_LSN:
        raise ConfigurationError(f"{lsn!r} is not a log sequence number (0 .. 2**64-1)")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
