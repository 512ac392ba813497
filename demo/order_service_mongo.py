"""The sample order service on MongoDB: the events ride in the order document itself."""

from __future__ import annotations

from typing import Any

from pymongo import ReturnDocument
from pymongo.database import Database

import outbox
from demo.order_service import PaymentDeclined
from outbox import mongo as outbox_mongo


def order_event(order: dict[str, Any], event_type: str) -> outbox.Event:
    return outbox.Event(
        aggregate_type="Order",
        aggregate_id=str(order["_id"]),
        event_type=event_type,
        payload={"orderId": order["_id"], "customer": order["customer"],
                 "totalCents": order["total_cents"], "version": order["version"]},
    )


class MongoOrderService:
    def __init__(self, db: Database[Any]) -> None:
        self.orders = db["orders"]
        self.counters = db["counters"]

    def place_order(self, customer: str, total_cents: int) -> outbox.Event:
        counter = self.counters.find_one_and_update(
            {"_id": "orders"}, {"$inc": {"next": 1}}, upsert=True,
            return_document=ReturnDocument.AFTER)
        assert counter is not None  # upsert=True always returns the document
        order = {"_id": counter["next"], "customer": customer, "total_cents": total_cents,
                 "state": "PENDING", "version": 1}
        event = order_event(order, "OrderCreated")
        # One single-document write: the order and its event, atomic without a transaction.
        self.orders.insert_one(outbox_mongo.new_document(order, event))
        return event

    def approve(self, order_id: int, *, payment_ok: bool = True) -> outbox.Event:
        return self._change(order_id, "APPROVED", "OrderApproved", payment_ok)

    def cancel(self, order_id: int) -> outbox.Event:
        return self._change(order_id, "CANCELLED", "OrderCancelled", True)

    def _change(self, order_id: int, state: str, event_type: str, ok: bool) -> outbox.Event:
        order = self.orders.find_one({"_id": order_id, "state": "PENDING"})
        if order is None:
            raise ValueError(f"order {order_id} cannot become {state}")
        changed = {**order, "state": state, "version": order["version"] + 1}
        event = order_event(changed, event_type)
        with self.orders.database.client.start_session() as session, \
                session.start_transaction():
            # The state check in the filter serialises writers of one order.
            result = self.orders.update_one(
                {"_id": order_id, "state": "PENDING"},
                outbox_mongo.with_events(
                    {"$set": {"state": state}, "$inc": {"version": 1}}, event),
                session=session)
            if result.modified_count != 1:
                raise ValueError(f"order {order_id} changed meanwhile")
            if not ok:
                raise PaymentDeclined(order_id)  # aborts the transaction: no change, no event
        return event
