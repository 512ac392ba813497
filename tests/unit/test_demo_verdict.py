"""The demo's verdict on its billing step (a command and its reply) finds what is wrong."""

from __future__ import annotations

from demo.__main__ import Tally, charge_verdict


def tally(approved: set[int]) -> Tally:
    made = Tally()
    made.approved = approved
    return made


def test_one_reply_per_approved_order_with_matching_invoices_is_ok() -> None:
    assert charge_verdict(tally({1, 2}), [(1, "success"), (2, "failure")],
                          [(1, "CHARGED"), (2, "PAYMENT_FAILED")]) == []


def test_twice_missing_unapproved_and_mismatched_are_each_reported() -> None:
    problems = charge_verdict(
        tally({1, 2, 3}),
        [(1, "success"), (1, "success"), (4, "success"), (2, "failure")],
        [(1, "CHARGED"), (2, "CHARGED"), (3, "CHARGING")],
    )
    assert problems == [
        "1 charge replies were applied twice",
        "1 orders got a charge reply without a committed approval",
        "1 approved orders got no charge reply applied",
        "1 invoices do not match their charge reply",
    ]
