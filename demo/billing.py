"""The sample billing service: applies each order event once, through the dedup table."""

from __future__ import annotations

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox.consumer import Consumer, Message

SCHEMA = """
CREATE TABLE IF NOT EXISTS invoices (
    order_id integer PRIMARY KEY, amount_cents integer NOT NULL, status text NOT NULL);
CREATE TABLE IF NOT EXISTS billing_applied (
    seq bigserial PRIMARY KEY, event_id uuid NOT NULL, order_id integer NOT NULL,
    version integer NOT NULL);
"""


def billing_consumer(engine: Engine, bootstrap: str, topics: list[str]) -> Consumer:
    consumer = Consumer(
        name="billing",
        kafka={"bootstrap.servers": bootstrap, "auto.offset.reset": "earliest"},
        topics=topics,
        db=engine,
    )

    def applied(session: Session, message: Message) -> dict[str, int]:
        order = message.json()
        session.execute(
            text("INSERT INTO billing_applied (event_id, order_id, version)"
                 " VALUES (:id, :order, :version)"),
            {"id": message.id, "order": order["orderId"], "version": order["version"]},
        )
        return dict(order)

    @consumer.handler("OrderCreated")
    def open_invoice(session: Session, message: Message) -> None:
        order = applied(session, message)
        session.execute(
            text("INSERT INTO invoices VALUES (:order, :amount, 'OPEN')"),
            {"order": order["orderId"], "amount": order["totalCents"]},
        )

    @consumer.handler("OrderApproved", "OrderCancelled")
    def settle_invoice(session: Session, message: Message) -> None:
        order = applied(session, message)
        status = "CHARGED" if message.event_type == "OrderApproved" else "VOID"
        session.execute(text("UPDATE invoices SET status = :s WHERE order_id = :order"),
                        {"s": status, "order": order["orderId"]})

    return consumer
