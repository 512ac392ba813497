"""The polling relay's cursor: late commits below the cursor are looked for, nothing twice."""

from __future__ import annotations

from relay.poll.cursor import PollCursor, Snapshot


def test_first_read_has_no_late_rows_and_moves_the_cursor() -> None:
    cursor = PollCursor()
    assert cursor.late_rows() is None
    cursor.advance(Snapshot("105", ("100",)), [1, 2, 3])
    assert cursor.after == 3


def test_transactions_incomplete_at_a_read_are_looked_for_below_its_cursor_next_time() -> None:
    cursor = PollCursor()
    first = Snapshot("105", ("100", "103"))
    cursor.advance(first, [1, 2])
    late = cursor.late_rows()
    assert late is not None and (late.snapshot, late.ceiling) == (first, 2)
    second = Snapshot("110", ())
    cursor.advance(second, [7])
    late = cursor.late_rows()
    assert late is not None and (late.snapshot, late.ceiling) == (second, 7)


def test_an_empty_page_keeps_the_cursor_and_nothing_is_late_before_a_first_row() -> None:
    cursor = PollCursor()
    cursor.advance(Snapshot("5", ()), [])
    assert cursor.after == 0 and cursor.late_rows() is None
    cursor = PollCursor(after=9)
    cursor.advance(Snapshot("5", ()), [])
    assert cursor.after == 9
