"""The sample order service: each state change and its event commit in one transaction."""

from __future__ import annotations

from sqlalchemy import Engine, String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import outbox


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(String(100))
    total_cents: Mapped[int]
    state: Mapped[str] = mapped_column(String(20))
    version: Mapped[int]  # numbers the order's events: consumers can check their order


class PaymentDeclined(Exception):
    """The payment check failed: the approval and its event are rolled back together."""


def order_event(order: Order, event_type: str) -> outbox.Event:
    return outbox.Event(
        aggregate_type="Order",
        aggregate_id=str(order.id),
        event_type=event_type,
        payload={"orderId": order.id, "customer": order.customer,
                 "totalCents": order.total_cents, "version": order.version},
    )


class OrderService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def place_order(self, customer: str, total_cents: int) -> outbox.Event:
        with Session(self.engine) as session, session.begin():
            order = Order(customer=customer, total_cents=total_cents, state="PENDING", version=1)
            session.add(order)
            session.flush()  # assigns order.id
            event = order_event(order, "OrderCreated")
            outbox.publish(session, event)  # same transaction as the INSERT
        return event

    def approve(self, order_id: int, *, payment_ok: bool = True) -> outbox.Event:
        return self._change(order_id, "APPROVED", "OrderApproved", payment_ok)

    def cancel(self, order_id: int) -> outbox.Event:
        return self._change(order_id, "CANCELLED", "OrderCancelled", True)

    def _change(self, order_id: int, state: str, event_type: str, ok: bool) -> outbox.Event:
        with Session(self.engine) as session, session.begin():
            # The row lock serialises writers of one order, so its events commit in order.
            order = session.get(Order, order_id, with_for_update=True)
            if order is None or order.state != "PENDING":
                raise ValueError(f"order {order_id} cannot become {state}")
            order.state, order.version = state, order.version + 1
            event = order_event(order, event_type)
            outbox.publish(session, event)
            if not ok:
                raise PaymentDeclined(order_id)  # rolls back the change and its event
        return event
