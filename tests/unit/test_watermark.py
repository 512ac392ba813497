"""The acknowledgement rule (relay/core/watermark.py): a position is confirmed only when its
group and every earlier one have all their answers."""

from __future__ import annotations

from relay.core.watermark import Watermark


def test_nothing_is_done_while_an_event_is_outstanding() -> None:
    marks: Watermark[int] = Watermark()
    first = marks.sent()
    marks.sent()
    marks.close(100)
    marks.done(first)
    assert marks.pop_done() == []
    assert marks.outstanding == 1


def test_a_later_group_waits_for_an_earlier_one() -> None:
    marks: Watermark[int] = Watermark()
    early = marks.sent()
    marks.close(100)
    late = marks.sent()
    marks.close(200)
    marks.done(late)  # Kafka answered the later one first (another partition)
    assert marks.pop_done() == []
    marks.done(early)
    done = marks.pop_done()
    assert [g.position for g in done] == [100, 200]
    assert [g.events for g in done] == [1, 1]
    assert marks.outstanding == 0 and marks.pop_done() == []


def test_groups_without_events_pass_once_earlier_ones_are_done() -> None:
    marks: Watermark[str] = Watermark()
    marks.close("a")  # a transaction of other tables only, a change with nothing to send
    token = marks.sent()
    marks.close("b")
    marks.close("c")
    assert [g.position for g in marks.pop_done()] == ["a"]
    assert marks.waiting == 2
    marks.done(token)
    assert [(g.position, g.events) for g in marks.pop_done()] == [("b", 1), ("c", 0)]


def test_a_group_still_being_read_is_never_done() -> None:
    marks: Watermark[int] = Watermark()
    token = marks.sent()
    marks.done(token)
    assert marks.pop_done() == []  # its end (a Commit, a change's token) has not been read
    assert marks.waiting == 0


def test_nothing_handed_out_confirms_nothing() -> None:
    assert Watermark[int]().pop_done() == []
