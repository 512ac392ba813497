"""The MongoDB relays' decisions with in-memory fakes: what is pulled, order, the token rule."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from bson import Binary

import outbox
from outbox.mongo import MongoOutbox
from relay.core.ports import OnDelivered, OnDelivery
from relay.core.testing import MemorySink, StopWhen
from relay.errors import DeliveryFailedError
from relay.mongo import MongoPollRelay, MongoRelayConfig, MongoStreamRelay
from relay.mongo.entries import appended_entries, in_change, in_document
from relay.mongo.errors import LeadershipLostError
from relay.mongo.paging import Sweep
from relay.mongo.testing import InMemoryStore
from relay.mongo.tracker import Acknowledgements, EntryRef, Pending, TokenLog
from relay.stats import RelayStats

WRITER = MongoOutbox(capture_trace_context=False)


def config(**overrides: Any) -> MongoRelayConfig:
    values: dict[str, Any] = {
        "url": "mongodb://127.0.0.1/shop", "collections": ("orders",), "poll_interval": 0.01,
        "ack_interval": 0.0, "page_documents": 3, "batch_size": 100, "max_in_flight": 1000,
        **overrides}
    return MongoRelayConfig(**values)


class Entries:
    """Entries with per-key sequence numbers, as `with_events` writes them."""

    def __init__(self, topic: str = "Order") -> None:
        self.topic = topic
        self.next: dict[str, int] = {}

    def __call__(self, key: str, count: int = 1, **options: Any) -> list[dict[str, Any]]:
        made = []
        for _ in range(count):
            seq = self.next.get(key, 0)
            self.next[key] = seq + 1
            made.append(outbox.Event(self.topic, key, "Sequenced", {"seq": seq}, **options))
        return WRITER.entries(made)


def seqs(records: list[outbox.OutboxRecord], key: str) -> list[int]:
    return [int(r.payload.split(b":")[1].rstrip(b"}")) for r in records if r.aggregate_id == key]


class Harness:
    """A relay wired to an InMemoryStore and a MemorySink."""

    def __init__(self, cfg: MongoRelayConfig, store: InMemoryStore | None = None) -> None:
        self.config = cfg
        self.store = store or InMemoryStore(cfg)
        self.publishers: list[MemorySink[Pending]] = []
        self.stats = RelayStats()
        self.paused = False
        self.refuse: dict[Any, tuple[str, bool]] = {}

    def publisher(
        self, on_delivery: OnDelivery, on_delivered: OnDelivered | None
    ) -> MemorySink[Pending]:
        made = MemorySink[Pending](on_delivery, on_delivered)
        made.paused = self.paused
        made.refuse = self.refuse
        self.publishers.append(made)
        return made

    @property
    def delivered(self) -> list[outbox.OutboxRecord]:
        return [r for p in self.publishers for r in p.delivered]

    @property
    def sent(self) -> list[outbox.OutboxRecord]:
        return [r for p in self.publishers for r in p.sent]

    def poll_relay(self) -> MongoPollRelay:
        return MongoPollRelay(self.config, stats=self.stats,
                              store_factory=lambda: self.store, publisher_factory=self.publisher)

    def stream_relay(self) -> MongoStreamRelay:
        return MongoStreamRelay(self.config, stats=self.stats,
                                store_factory=lambda: self.store,
                                publisher_factory=self.publisher)

    def run_until(self, relay: Any, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        relay.run(StopWhen(condition, timeout))
        assert condition(), "the relay stopped before the condition held"

    def run_for(self, relay: Any, seconds: float) -> None:
        relay.run(StopWhen(lambda: False, seconds))


def ref(doc: int, event: int, *, collection: str = "orders") -> EntryRef:
    return EntryRef.of(collection, doc, Binary.from_uuid(uuid.UUID(int=event)), embedded=True)


def pending(doc: int, event: int) -> Pending:
    return Pending(ref(doc, event), {})


# -- what is pulled -------------------------------------------------------------------------------


def test_only_delivered_entries_are_pulled_grouped_per_document_in_send_order() -> None:
    acks = Acknowledgements()
    a1, a2, a3, b1 = pending(1, 1), pending(1, 2), pending(1, 3), pending(2, 4)
    for p in (a1, a2, a3, b1):
        acks.sent(p)
    acks.delivered(a1)
    acks.delivered(b1)
    acks.delivered(a3)  # a2 is still in flight: a3 may be pulled, a2 must stay
    plan = acks.plan()
    assert plan.pulls == {
        ("orders", a1.ref.document_key): (1, [a1.ref.event_id, a3.ref.event_id]),
        ("orders", b1.ref.document_key): (2, [b1.ref.event_id]),
    }
    acks.applied(plan)
    assert not acks.is_known(a1.ref) and acks.is_known(a2.ref)


def test_known_entries_are_not_sent_again_until_their_pull_is_applied() -> None:
    acks = Acknowledgements()
    first = pending(1, 1)
    acks.sent(first)
    acks.delivered(first)
    assert acks.is_known(first.ref), "delivered but not yet pulled: a re-read still shows it"
    plan = acks.plan()
    assert acks.is_known(first.ref)
    acks.applied(plan)
    assert not acks.is_known(first.ref)


def test_parked_entries_are_recorded_then_pulled() -> None:
    acks = Acknowledgements()
    bad = Pending(ref(1, 1), {"id": "x"})
    acks.sent(bad)
    acks.parked(bad, "too large")
    plan = acks.plan()
    assert [p.reason for p in plan.parks] == ["too large"]
    assert plan.pulls[("orders", bad.ref.document_key)][1] == [bad.ref.event_id]


def test_outbox_collection_documents_are_deleted_not_pulled() -> None:
    acks = Acknowledgements()
    item = Pending(EntryRef.of("outbox", "e1", "e1", embedded=False), {})
    acks.sent(item)
    acks.delivered(item)
    plan = acks.plan()
    assert plan.deletes == {"outbox": ["e1"]} and not plan.pulls


def test_refs_compare_by_stored_value_whatever_the_id_type() -> None:
    assert EntryRef.of("c", {"a": 1}, "x", embedded=True) == EntryRef.of(
        "c", {"a": 1}, "x", embedded=True)
    assert EntryRef.of("c", 1, "x", embedded=True) != EntryRef.of("c", "1", "x", embedded=True)
    assert len({ref(1, 1), ref(1, 1), ref(1, 2)}) == 2


# -- order and change events ---------------------------------------------------------------------


def test_appended_entries_come_in_list_order_with_numeric_positions() -> None:
    updated: dict[str, Any] = {f"_outbox.{i}": {"n": i} for i in (10, 9, 11)}
    updated["_outbox.3.topic"] = "ignored: not a whole entry"
    updated["state"] = "ignored"
    assert [e["n"] for e in appended_entries(updated, "_outbox")] == [9, 10, 11]
    assert appended_entries({"_outbox": [{"n": 1}, {"n": 2}]}, "_outbox") == [{"n": 1}, {"n": 2}]
    assert appended_entries({"_outboxes.1": {"n": 1}}, "_outbox") == []


def change(operation: str, coll: str = "orders", **more: Any) -> dict[str, Any]:
    return {"_id": {"_data": "1"}, "operationType": operation, "ns": {"coll": coll},
            "documentKey": {"_id": 7}, **more}


def test_change_events_yield_the_entries_the_write_added() -> None:
    make = Entries()
    options = {"list_field": "_outbox", "marker_field": "_outbox_relayed_at",
               "outbox_collection": "outbox"}
    inserted = make("7", 2)
    found = in_change(change("insert", fullDocument={"_id": 7, "_outbox": inserted}), **options)
    assert [p.entry for p in found.pending] == inserted
    appended = make("7", 1)
    found = in_change(change("update", updateDescription={
        "updatedFields": {"_outbox.2": appended[0], "state": "x"}}), **options)
    assert [p.entry for p in found.pending] == appended
    # The relay's own pull lists old entries: it is recognised by its marker and skipped.
    assert not in_change(change("update", updateDescription={"updatedFields": {
        "_outbox": inserted, "_outbox_relayed_at": 1}}), **options).pending
    (one,) = WRITER.entries([outbox.Event("Order", "1", "X")])
    outbox_doc = {"_id": one.pop("id"), **one}
    found = in_change(change("insert", "outbox", fullDocument=outbox_doc), **options)
    assert [p.ref.embedded for p in found.pending] == [False]
    assert not in_change(change("delete"), **options).pending


def test_entries_without_an_id_are_counted_and_malformed_ones_become_problems() -> None:
    (good,) = Entries()("1")
    found = in_document("orders", {"_id": 1, "_outbox": [
        {"no": "id"}, "text", {**good, "aggregate_id": ""}, good]}, "_outbox")
    assert found.unidentifiable == 2
    assert [p.problem is not None for p in found.pending] == [True, False]


# -- the resume-token rule ------------------------------------------------------------------------


def token(n: int) -> dict[str, str]:
    return {"_data": f"{n:04d}"}


def test_a_token_is_committable_only_when_its_change_and_all_before_are_acknowledged() -> None:
    log = TokenLog()
    log.change(token(1), [ref(1, 1), ref(1, 2)])
    log.change(token(2), [ref(2, 3)])
    log.change(token(3), [])  # e.g. an update that added no event
    assert log.committable() is None
    log.acknowledged([ref(2, 3)])  # a later change finishing first moves nothing
    assert log.committable() is None
    log.acknowledged([ref(1, 1)])
    assert log.committable() is None
    log.acknowledged([ref(1, 2)])
    assert log.committable() == token(3)
    assert log.empty


def test_a_change_that_relists_an_entry_in_flight_waits_for_the_earlier_change() -> None:
    log = TokenLog()
    log.change(token(1), [ref(1, 1)])
    log.change(token(2), [])  # showed ref(1, 1) again; nothing new was sent for it
    assert log.committable() is None
    log.acknowledged([ref(1, 1)])
    assert log.committable() == token(2)


# -- paging --------------------------------------------------------------------------------------


def test_a_sweep_pages_by_id_and_crosses_bson_type_brackets() -> None:
    sweep = Sweep("orders", embedded=True)
    assert sweep.id_filter() == {}
    assert not sweep.advance(5, more=True)
    assert sweep.id_filter() == {"_id": {"$gt": 5}}
    # The numbers are exhausted: go on with the types that sort after numbers.
    assert not sweep.advance(None, more=False)
    types = sweep.id_filter()["_id"]["$type"]
    assert "string" in types and "objectId" in types and "int" not in types
    assert not sweep.advance("m", more=True)
    assert sweep.id_filter() == {"_id": {"$gt": "m"}}
    assert not sweep.advance(None, more=False)
    assert sweep.advance(None, more=False)
    assert sweep.at_start and sweep.passes == 1


def test_poll_reaches_documents_of_every_id_type() -> None:
    cfg = config(page_documents=1)
    h = Harness(cfg)
    make = Entries()
    for document_id in (3, "b", 1, "a", 2.5):
        h.store.insert("orders", {"_id": document_id, "_outbox": make(str(document_id))})
    h.run_until(h.poll_relay(), lambda: not h.store.pending())
    assert {r.aggregate_id for r in h.delivered} == {"3", "b", "1", "a", "2.5"}


# -- the poll relay ------------------------------------------------------------------------------


def test_poll_publishes_in_list_order_and_pulls_exactly_what_was_delivered() -> None:
    h = Harness(config())
    make = Entries()
    for n in range(7):
        h.store.insert("orders", {"_id": n, "state": "new", "_outbox": make(f"k{n}", 5)})
    h.run_until(h.poll_relay(), lambda: not h.store.pending())
    for n in range(7):
        assert seqs(h.delivered, f"k{n}") == [0, 1, 2, 3, 4]
    assert h.store.collections["orders"][3]["state"] == "new"
    assert len(h.sent) == 35, "no event sent twice"


def test_an_entry_appended_after_the_read_is_not_pulled_and_goes_out_next() -> None:
    h = Harness(config())
    make = Entries()
    h.store.insert("orders", {"_id": 1, "_outbox": make("k", 2)})
    pushed: list[bool] = []
    original_page = h.store.page

    def page_then_write(*args: Any, **kwargs: Any) -> Any:
        result = original_page(*args, **kwargs)
        if result and not pushed:  # the application writes while the relay holds its read
            h.store.push("orders", 1, *make("k", 1))
            pushed.append(True)
        return result

    h.store.page = page_then_write  # type: ignore[method-assign]
    h.run_until(h.poll_relay(), lambda: not h.store.pending())
    first_pull = h.store.plans[0].pulls
    (pulled,) = first_pull.values()
    assert len(pulled[1]) == 2, "only the two entries that were read and delivered"
    assert seqs(h.delivered, "k") == [0, 1, 2]


def test_a_failed_delivery_pulls_only_what_was_delivered_and_restarts() -> None:
    h = Harness(config())
    make = Entries()
    entries = make("k", 3)
    h.store.insert("orders", {"_id": 1, "_outbox": entries})
    h.refuse[outbox.mongo.event_id_of(entries[1]["id"])] = ("Local: Message timed out", False)
    with pytest.raises(DeliveryFailedError, match="timed out"):
        h.run_until(h.poll_relay(), lambda: False, timeout=5)
    remaining = h.store.pending()
    assert remaining == [entries[1]["id"]], "delivered ones pulled, the failed one kept"
    h.refuse.clear()
    h.run_until(h.poll_relay(), lambda: not h.store.pending())
    # The fake delivered the third event although the second failed; librdkafka's idempotent
    # producer fails a partition's later messages too, which keeps the order there.
    assert sorted(seqs(h.delivered, "k")) == [0, 1, 2]


def test_unpublishable_events_are_parked_while_others_flow() -> None:
    h = Harness(config())
    make = Entries()
    big = make("big", 1)
    bad_topic = Entries("not a valid topic!")("k", 1)
    malformed = {**make("m", 1)[0], "aggregate_type": 7}
    h.store.insert("orders", {"_id": 1, "_outbox": [*big, *make("a", 2)]})
    h.store.insert("orders", {"_id": 2, "_outbox": [*bad_topic, malformed, *make("b", 2)]})
    h.refuse[outbox.mongo.event_id_of(big[0]["id"])] = ("Broker: Message size too large", True)
    h.run_until(h.poll_relay(), lambda: not h.store.pending())
    assert seqs(h.delivered, "a") == [0, 1] and seqs(h.delivered, "b") == [0, 1]
    reasons = {str(outbox.mongo.event_id_of(k)): v["reason"] for k, v in h.store.parked.items()}
    assert len(reasons) == 3
    assert reasons[str(outbox.mongo.event_id_of(big[0]["id"]))] == "Broker: Message size too large"
    assert any("invalid topic" in r for r in reasons.values())
    assert any("aggregate_type" in r for r in reasons.values())
    assert h.stats.parked == 3


def test_nothing_is_pulled_while_kafka_does_not_answer_and_reading_stops_at_the_cap() -> None:
    cfg = config(batch_size=5, max_in_flight=10, page_documents=2)
    h = Harness(cfg)
    h.paused = True
    make = Entries()
    for n in range(10):
        h.store.insert("orders", {"_id": n, "_outbox": make(f"k{n}", 5)})
    h.run_for(h.poll_relay(), 0.5)
    assert len(h.store.pending()) == 50, "nothing acknowledged without a delivery report"
    assert len(h.sent) == 10, "reading stopped once max_in_flight was reached"
    assert [c for c, _ in h.store.pages].count("orders") == 2
    assert not h.store.plans


def test_poll_serves_every_collection_and_the_outbox_collection() -> None:
    h = Harness(config(collections=("orders", "invoices")))
    make = Entries()
    h.store.insert("orders", {"_id": 1, "_outbox": make("o", 2)})
    h.store.insert("invoices", {"_id": 1, "_outbox": make("i", 2)})
    (entry,) = make("c", 1)
    h.store.insert("outbox", {"_id": entry.pop("id"), **entry})
    h.run_until(h.poll_relay(), lambda: not h.store.pending())
    assert {r.aggregate_id for r in h.delivered} == {"o", "i", "c"}
    assert not h.store.collections["outbox"]


# -- leadership ----------------------------------------------------------------------------------


def test_a_standby_waits_while_another_relay_holds_the_lease_then_takes_over() -> None:
    h = Harness(config(standby_interval=0.01, lease_ttl=0.2))
    h.store.insert("orders", {"_id": 1, "_outbox": Entries()("k", 1)})
    h.store.lease_owner, h.store.lease_expires = "other", time.monotonic() + 0.3
    started = time.monotonic()
    h.run_until(h.poll_relay(), lambda: not h.store.pending())
    assert time.monotonic() - started >= 0.25, "it published before the other lease expired"
    assert h.store.lease_expires <= time.monotonic(), "the lease is released on stop"


def test_a_relay_restarted_by_its_daemon_takes_its_own_lease_back_at_once() -> None:
    h = Harness(config(lease_ttl=60, standby_interval=5))
    h.store.insert("orders", {"_id": 1, "_outbox": Entries()("k", 1)})
    h.store.lease_owner, h.store.lease_expires = "daemon-1", time.monotonic() + 60
    relay = MongoPollRelay(h.config, stats=h.stats, store_factory=lambda: h.store,
                           publisher_factory=h.publisher, owner="daemon-1")
    h.run_until(relay, lambda: not h.store.pending(), timeout=2)


def test_a_leader_whose_lease_was_taken_over_stops_publishing() -> None:
    h = Harness(config(lease_ttl=0.03, poll_interval=0.01))
    relay = h.poll_relay()

    def steal() -> bool:
        if h.store.lease_owner not in (None, "other"):
            h.store.lease_owner, h.store.lease_expires = "other", time.monotonic() + 60
        return False

    with pytest.raises(LeadershipLostError):
        h.run_until(relay, steal, timeout=5)


# -- the stream relay ----------------------------------------------------------------------------


def test_without_a_token_the_stream_scans_first_then_streams_from_before_the_scan() -> None:
    h = Harness(config())
    make = Entries()
    for n in range(5):
        h.store.insert("orders", {"_id": n, "_outbox": make(f"k{n}", 2)})
    original_page = h.store.page
    written: list[bool] = []

    def page_then_write(*args: Any, **kwargs: Any) -> Any:
        result = original_page(*args, **kwargs)
        if not written:  # a change made while the scan runs
            h.store.push("orders", 99, *make("late", 1))
            written.append(True)
        return result

    h.store.page = page_then_write  # type: ignore[method-assign]
    h.run_until(h.stream_relay(), lambda: not h.store.pending() and h.store.token is not None)
    assert seqs(h.delivered, "late") == [0]
    for n in range(5):
        assert seqs(h.delivered, f"k{n}")[:2] == [0, 1]
    assert h.store.saved_tokens[0] == {"_data": f"{10 - 5:010d}"}, (
        "the first token stored is the position taken before the scan")


def test_the_stream_stores_a_token_only_after_kafka_acknowledged_everything_before_it() -> None:
    h = Harness(config())
    make = Entries()
    h.run_until(h.stream_relay(), lambda: h.store.token is not None)  # empty: token at start
    start = h.store.token
    h.store.insert("orders", {"_id": 1, "_outbox": make("a", 2)})
    h.store.push("orders", 1, *make("a", 1))
    h.paused = True
    h.run_until(h.stream_relay(), lambda: len(h.sent) == 3, timeout=5)
    assert h.store.token == start, "deliveries outstanding: the token must not move"
    h.paused = False
    h.run_until(h.stream_relay(), lambda: not h.store.pending() and h.store.token != start)
    assert seqs(h.delivered, "a")[:3] == [0, 1, 2]


def test_an_idle_stream_refreshes_its_token_only_at_the_token_interval() -> None:
    # Changes the relay does not watch move the stream's position while it has nothing to
    # send; storing it on every idle turn would write to MongoDB many times a second.
    h = Harness(config(token_interval=3600.0))
    h.run_until(h.stream_relay(), lambda: h.store.token is not None)
    saved = len(h.store.saved_tokens)
    others = iter(range(50))

    def another_write_elsewhere() -> bool:
        n = next(others, None)
        if n is None:
            return True
        h.store.insert("customers", {"_id": n})
        return False

    h.run_until(h.stream_relay(), another_write_elsewhere)
    # Resumed, then 50 changes elsewhere while idle: the token is stored once more at the
    # stop (so the next run resumes past them), not once per idle turn.
    assert len(h.store.saved_tokens) - saved <= 1


def test_a_restarted_stream_resumes_from_its_token_without_sending_again() -> None:
    h = Harness(config())
    make = Entries()
    h.run_until(h.stream_relay(), lambda: h.store.token is not None)
    for n in range(3):
        h.store.insert("orders", {"_id": n, "_outbox": make(f"k{n}", 2)})
        h.store.push("orders", n, *make(f"k{n}", 1))
    h.run_until(h.stream_relay(), lambda: not h.store.pending())
    sent_before, pages_before = len(h.sent), len(h.store.pages)
    h.store.push("orders", 0, *make("k0", 1))
    h.run_until(h.stream_relay(), lambda: not h.store.pending())
    assert len(h.sent) == sent_before + 1, "only the new event; nothing replayed"
    assert seqs(h.delivered, "k0") == [0, 1, 2, 3]
    assert len(h.store.pages) == pages_before, "resumed from the token: no scan"


def test_an_invalid_token_is_cleared_and_replaced_by_a_full_scan() -> None:
    h = Harness(config())
    make = Entries()
    h.store.insert("orders", {"_id": 1, "_outbox": make("k", 3)})
    h.store.token = {"_data": "garbage"}
    h.run_until(h.stream_relay(), lambda: not h.store.pending() and h.store.token is not None)
    assert seqs(h.delivered, "k") == [0, 1, 2]
    assert h.store.token != {"_data": "garbage"}


def test_a_token_whose_history_was_lost_falls_back_to_a_scan_and_loses_nothing() -> None:
    h = Harness(config())
    make = Entries()
    h.run_until(h.stream_relay(), lambda: h.store.token is not None)
    h.store.insert("orders", {"_id": 1, "_outbox": make("k", 2)})
    h.store.history_starts = len(h.store.changes) + 1  # the oplog rolled over
    h.run_until(h.stream_relay(), lambda: not h.store.pending())
    assert seqs(h.delivered, "k") == [0, 1]


def test_the_stream_ignores_its_own_pulls_and_keeps_per_document_order() -> None:
    h = Harness(config())
    make = Entries()
    h.run_until(h.stream_relay(), lambda: h.store.token is not None)
    for round_ in range(4):
        for n in range(3):
            if round_ == 0:
                h.store.insert("orders", {"_id": n, "_outbox": make(f"k{n}", 2)})
            else:
                h.store.push("orders", n, *make(f"k{n}", 2))
        h.run_until(h.stream_relay(), lambda: not h.store.pending())
    for n in range(3):
        assert seqs(h.delivered, f"k{n}") == list(range(8))
    assert len(h.sent) == 24, "pull echoes never cause a send"


def test_deleted_documents_events_still_go_out_from_the_change_itself() -> None:
    h = Harness(config())
    make = Entries()
    h.run_until(h.stream_relay(), lambda: h.store.token is not None)
    h.store.insert("orders", {"_id": 1, "_outbox": make("gone", 2)})
    h.store.delete("orders", 1)
    h.run_until(h.stream_relay(), lambda: len(h.delivered) == 2)
    assert seqs(h.delivered, "gone") == [0, 1]


def test_config_refuses_overlapping_collections_and_a_url_without_database() -> None:
    with pytest.raises(outbox.ConfigurationError, match="names no valid database"):
        config(url="mongodb://127.0.0.1:27017/?replicaSet=rs0")
    with pytest.raises(outbox.ConfigurationError, match="also listed"):
        config(collections=("orders", "outbox"))
    with pytest.raises(outbox.ConfigurationError, match="duplicates"):
        config(collections=("orders", "orders"))
    with pytest.raises(outbox.ConfigurationError, match="max_in_flight"):
        config(batch_size=100, max_in_flight=10)
