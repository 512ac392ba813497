"""The shared acknowledgement rule (relay/in_order.py): only a done prefix is confirmed."""

from __future__ import annotations

from dataclasses import dataclass

from relay.in_order import InOrder


@dataclass
class Work:
    name: str
    outstanding: int


def test_a_group_done_early_waits_for_the_groups_before_it() -> None:
    first, second, third = Work("a", 1), Work("b", 0), Work("c", 2)
    groups: InOrder[Work] = InOrder()
    for group in (first, second, third):
        groups.append(group)
    assert groups.pop_done() == []  # b is done, but a is not
    first.outstanding = 0
    assert groups.pop_done() == [first, second]
    third.outstanding = 0
    assert groups.pop_done() == [third]
    assert len(groups) == 0


def test_nothing_handed_out_confirms_nothing() -> None:
    assert InOrder[Work]().pop_done() == []
