"""Time-ordered event ids (UUID version 7, RFC 9562), monotonic within this process."""

from __future__ import annotations

import os
import threading
import time
import uuid

# Random bits come from the OS CSPRNG, read a block at a time: one getrandom() call per id
# was a quarter of the id's cost.
_RANDOM_BLOCK = 4096
_lock = threading.Lock()
_last_ms = 0
_counter = 0
_random = b""
_random_at = _RANDOM_BLOCK


def _forget_random_after_fork() -> None:
    # A forked child must not hand out the random bits its parent also uses.
    global _random_at
    _random_at = _RANDOM_BLOCK


os.register_at_fork(after_in_child=_forget_random_after_fork)


def _random_bits(nbytes: int) -> int:
    """`nbytes` random bytes as an int; call with `_lock` held."""
    global _random, _random_at
    if _random_at + nbytes > _RANDOM_BLOCK:
        _random, _random_at = os.urandom(_RANDOM_BLOCK), 0
    start = _random_at
    _random_at += nbytes
    return int.from_bytes(_random[start : start + nbytes])


# -- building UUIDs from an int, fast -------------------------------------------------------------
# uuid.UUID.__init__ validates five spellings of its argument; from an int already in range the
# result is just two slots. Less than half the cost, and every event pays it once or twice (its
# id made here, read back by a relay).

_new_object = object.__new__
_set_attribute = object.__setattr__
_SAFE_UNKNOWN = uuid.SafeUUID.unknown
_MAX_UUID = (1 << 128) - 1


def _uuid_from_int_fast(value: int) -> uuid.UUID:
    if not 0 <= value <= _MAX_UUID:
        raise ValueError("a UUID is a 128-bit unsigned integer")
    made = _new_object(uuid.UUID)
    _set_attribute(made, "int", value)
    _set_attribute(made, "is_safe", _SAFE_UNKNOWN)
    return made


def _uuid_from_int_checked(value: int) -> uuid.UUID:
    return uuid.UUID(int=value)


def _fast_path_works() -> bool:
    sample = int.from_bytes(bytes(range(1, 17)))
    try:
        fast, slow = _uuid_from_int_fast(sample), uuid.UUID(int=sample)
        return (fast, str(fast), hash(fast), fast.version, fast.is_safe, fast.bytes) == (
            slow, str(slow), hash(slow), slow.version, slow.is_safe, slow.bytes
        )
    except (AttributeError, TypeError):
        return False


# Another Python whose UUID keeps other state falls back to the constructor.
UUID_BY_SLOTS = _fast_path_works()
"""True when a UUID is built by setting its `int` and `is_safe` slots (the relay's compiled row
reader then builds them the same way; relay/native.py)."""
uuid_from_int = _uuid_from_int_fast if UUID_BY_SLOTS else _uuid_from_int_checked


def uuid_from_text(text: str) -> uuid.UUID:
    """A UUID from its canonical text (8-4-4-4-12 hex digits), else as uuid.UUID reads it."""
    if len(text) == 36 and text[8] == text[13] == text[18] == text[23] == "-":
        return uuid_from_int(int(text.replace("-", ""), 16))  # ValueError if not hex
    return uuid.UUID(text)


def uuid7() -> uuid.UUID:
    """A UUIDv7: 48-bit Unix milliseconds, then a 12-bit counter so ids made in the same
    millisecond by this process still sort in creation order (RFC 9562, method 1), then 62
    random bits."""
    global _last_ms, _counter
    with _lock:
        rand = _random_bits(8) & 0x3FFF_FFFF_FFFF_FFFF
        now_ms = time.time_ns() // 1_000_000
        if now_ms > _last_ms:
            # Start each millisecond at a random 9-bit value, leaving room to count up.
            _last_ms, _counter = now_ms, _random_bits(2) & 0x1FF
        else:
            # Clock went back or same millisecond: keep ordering by advancing the counter,
            # borrowing the next millisecond when the counter overflows.
            _counter += 1
            if _counter > 0xFFF:
                _last_ms, _counter = _last_ms + 1, 0
        ms, counter = _last_ms, _counter
    return uuid_from_int((ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand)
