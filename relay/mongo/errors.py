"""Errors of the MongoDB relay sources: what a restart cures, and how."""

from __future__ import annotations

from relay.errors import RetryableError


class ResumeTokenInvalidError(RetryableError):
    """The stored change-stream resume token can no longer be used (history lost or token not
    recognised): the relay clears it and starts over with a full scan, so nothing is lost."""


class LeadershipLostError(RetryableError):
    """Another relay took over this relay's lease (this one stalled past the lease's expiry);
    this relay restarts as a standby."""
