"""The consumer's run-loop decisions (outbox.consumer.schedule) and the engine's reading of
store failures, without services."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from outbox.consumer import InboxMissingError, InboxStoreError, RetryPolicy
from outbox.consumer.engine import BatchEngine, Begin, Claim, Commit, Rollback, Sleep
from outbox.consumer.message import parse
from outbox.consumer.schedule import Fetch, PurgeSchedule, RunLimits, dead_letter_delay
from outbox.errors import ConfigurationError


def limits(**given: Any) -> RunLimits:
    options: dict[str, Any] = {"batch_size": 100, "poll_timeout": 1.0, "max_messages": None,
                               "timeout": None, "now": 0.0}
    return RunLimits(**{**options, **given})


def test_a_run_fetches_a_batch_at_a_time_until_max_messages_are_resolved() -> None:
    run = limits(max_messages=250)
    assert run.next_fetch(0.0) == Fetch(100, 1.0)
    run.resolved(100)
    run.resolved(100)
    assert run.next_fetch(0.0) == Fetch(50, 1.0)
    run.resolved(50)
    assert run.next_fetch(0.0) is None


def test_a_run_waits_no_longer_than_its_timeout_and_the_longest_poll() -> None:
    run = limits(timeout=10.0, now=100.0, longest_poll=0.5)
    assert run.next_fetch(100.0) == Fetch(100, 0.5)
    assert run.next_fetch(109.8) == Fetch(100, pytest.approx(0.2))
    assert run.next_fetch(110.0) is None
    assert limits().next_fetch(1e9) == Fetch(100, 1.0)


def test_the_inbox_is_purged_at_the_first_fetch_then_every_period() -> None:
    week, hour = dt.timedelta(days=7), dt.timedelta(hours=1)
    purges = PurgeSchedule(week, hour)
    assert purges.due(5.0) == week
    assert purges.due(5.0 + 3599) is None
    assert purges.due(5.0 + 3600) == week
    assert PurgeSchedule(None, hour).due(5.0) is None


def test_dead_letters_are_resent_with_a_growing_capped_wait() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=1e6, multiplier=2.0, jitter=0.0)
    assert dead_letter_delay(policy, 1) == 0.5
    assert dead_letter_delay(policy, 3) == 2.0
    assert dead_letter_delay(policy, 16) == dead_letter_delay(policy, 40)


class Refused(Exception):
    sqlstate = "42P01"


def steps_until_failure(error: Exception, at: type) -> BaseException:
    items = [parse("Order", 0, 1, b"k", b"{}", [("id", str(uuid.uuid4()).encode()),
                                              ("event_type", b"Created")])]
    engine = BatchEngine(items, RetryPolicy(), lambda message: True,
                         is_transient=lambda exc: False, consumer="billing")
    steps = engine.run()
    step = next(steps)
    with pytest.raises(BaseException) as raised:  # whichever: it is what the test looks at
        while True:
            if isinstance(step, at):
                step = steps.throw(error)
            elif isinstance(step, Claim):
                step = steps.send(set(step.ids))
            else:
                step = steps.send(None)
    return raised.value


def test_a_store_failure_no_retry_cures_ends_the_run_as_the_projects_error() -> None:
    missing = steps_until_failure(Refused("relation outbox_inbox does not exist"), Claim)
    assert isinstance(missing, InboxMissingError)
    other = steps_until_failure(RuntimeError("disk full"), Begin)
    assert isinstance(other, InboxStoreError)
    assert "opening a transaction failed: disk full" in str(other)
    assert isinstance(other.__cause__, RuntimeError)
    ours = ConfigurationError("bad")
    assert steps_until_failure(ours, Begin) is ours


def test_a_transient_store_failure_rolls_back_and_waits_before_the_retry() -> None:
    items = [parse("Order", 0, 1, b"k", b"{}", [("id", str(uuid.uuid4()).encode()),
                                              ("event_type", b"Created")])]
    engine = BatchEngine(items, RetryPolicy(), lambda message: True,
                         is_transient=lambda exc: True, rand=lambda: 0.5)
    steps = engine.run()
    assert isinstance(next(steps), Begin)
    claim = steps.send(None)
    assert isinstance(claim, Claim)
    assert isinstance(steps.throw(ConnectionError("gone")), Rollback)
    assert isinstance(steps.send(None), Sleep)
    assert isinstance(steps.send(True), Begin)
    assert isinstance(steps.send(None), Claim)
    steps.send(set(claim.ids))  # Handle
    assert isinstance(steps.send(None), Commit)
