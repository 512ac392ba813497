"""The WAL relay's acknowledgement rule: the slot moves to a commit only when that transaction
and every earlier one have all their delivery reports."""

from relay.wal.acks import CommitTracker


def test_nothing_is_done_while_an_event_is_outstanding() -> None:
    tracker = CommitTracker()
    first = tracker.event_sent()
    tracker.event_sent()
    tracker.committed(100, commit_time_us=7)
    tracker.event_done(first)
    assert tracker.pop_done() == []
    assert tracker.outstanding == 1


def test_a_later_transaction_waits_for_an_earlier_one() -> None:
    tracker = CommitTracker()
    early = tracker.event_sent()
    tracker.committed(100)
    late = tracker.event_sent()
    tracker.committed(200)
    tracker.event_done(late)  # Kafka answered the later one first (another partition)
    assert tracker.pop_done() == []
    tracker.event_done(early)
    done = tracker.pop_done()
    assert [t.end_lsn for t in done] == [100, 200]
    assert [t.events for t in done] == [1, 1]
    assert tracker.outstanding == 0 and tracker.pop_done() == []


def test_transactions_without_events_pass_once_earlier_ones_are_done() -> None:
    tracker = CommitTracker()
    tracker.committed(100)  # a transaction of other tables only
    token = tracker.event_sent()
    tracker.committed(200, commit_time_us=42)
    tracker.committed(300)
    assert [t.end_lsn for t in tracker.pop_done()] == [100]
    tracker.event_done(token)
    done = tracker.pop_done()
    assert [(t.end_lsn, t.events, t.commit_time_us) for t in done] == [(200, 1, 42), (300, 0, 0)]


def test_an_uncommitted_transaction_is_never_done() -> None:
    tracker = CommitTracker()
    token = tracker.event_sent()
    tracker.event_done(token)
    assert tracker.pop_done() == []  # its Commit has not been read yet
    assert tracker.transactions_waiting == 0
