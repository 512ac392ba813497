"""What to do after a handler failed: retry with exponential backoff, dead-letter or stop."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from outbox.consumer.errors import RejectMessage
from outbox.errors import ConfigurationError

# Dead-letter headers and logs keep this much of an error's text.
MAX_ERROR_TEXT = 2000


class Verdict(enum.Enum):
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    delay: float = 0.0


@dataclass(frozen=True)
class RetryPolicy:
    """How a failing handler is retried.

    `tries` counts every call, the first included. The wait before try n+1 is
    `base_delay * multiplier**(n-1)`, capped at `max_delay`, then spread by +-`jitter` (a
    fraction) so that consumers that failed together do not retry together. After the last try
    the message is dead-lettered, or, with `on_exhausted="stop"`, the consumer stops without
    committing its offset. A handler that raises `RejectMessage` is dead-lettered at once.
    """

    tries: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.1
    on_exhausted: Literal["dead_letter", "stop"] = "dead_letter"

    def __post_init__(self) -> None:
        if not isinstance(self.tries, int) or self.tries < 1:
            raise ConfigurationError(f"retry tries={self.tries!r} must be an integer >= 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ConfigurationError("retry base_delay and max_delay must be >= 0 seconds")
        if self.max_delay < self.base_delay:
            raise ConfigurationError(
                f"retry max_delay={self.max_delay} is below base_delay={self.base_delay}"
            )
        if self.multiplier < 1:
            raise ConfigurationError(f"retry multiplier={self.multiplier} must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ConfigurationError(f"retry jitter={self.jitter} must be in [0, 1)")
        if self.on_exhausted not in ("dead_letter", "stop"):
            raise ConfigurationError(
                f"retry on_exhausted={self.on_exhausted!r}: choose 'dead_letter' or 'stop'"
            )

    def delay(self, failures: int, rand: float = 0.5) -> float:
        """Seconds to wait after `failures` failed tries; `rand` in [0, 1) places the jitter."""
        exponent = min(max(failures - 1, 0), 64)  # beyond this the cap applies anyway
        raw = min(self.max_delay, self.base_delay * self.multiplier**exponent)
        return min(self.max_delay, max(0.0, raw * (1 + self.jitter * (2 * rand - 1))))

    def longest_wait(self) -> float:
        """The most a message can spend waiting between its tries (jitter at its worst)."""
        return sum(
            min(self.max_delay, self.base_delay * self.multiplier ** min(n, 64)) * (1 + self.jitter)
            for n in range(self.tries - 1)
        )

    def decide(self, failures: int, error: BaseException, rand: float = 0.5) -> Decision:
        """After `failures` failed tries ending with `error`: retry (and when), or give up."""
        if isinstance(error, RejectMessage):
            return Decision(Verdict.DEAD_LETTER)
        if failures >= self.tries:
            verdict = Verdict.STOP if self.on_exhausted == "stop" else Verdict.DEAD_LETTER
            return Decision(verdict)
        return Decision(Verdict.RETRY, self.delay(failures, rand))


def describe(error: BaseException) -> str:
    """`Type: message`, bounded, for dead-letter headers and logs."""
    text = f"{type(error).__name__}: {error}".strip()
    if len(text) > MAX_ERROR_TEXT:
        text = text[: MAX_ERROR_TEXT - 3] + "..."
    return text
