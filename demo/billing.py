"""The sample billing service: applies each order event once, through the dedup table, and
charges each approved order with a command to the payments service, whose reply settles the
invoice (commands and replies through the outbox: outbox.commands)."""

from __future__ import annotations

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox import commands
from outbox.consumer import Consumer, Message

SCHEMA = """
CREATE TABLE IF NOT EXISTS invoices (
    order_id integer PRIMARY KEY, amount_cents integer NOT NULL, status text NOT NULL);
CREATE TABLE IF NOT EXISTS billing_applied (
    seq bigserial PRIMARY KEY, event_id uuid NOT NULL, order_id integer NOT NULL,
    version integer NOT NULL);
CREATE TABLE IF NOT EXISTS payments (
    command_id uuid NOT NULL, order_id integer NOT NULL, amount_cents integer NOT NULL);
CREATE TABLE IF NOT EXISTS billing_replies (
    reply_id uuid NOT NULL, command_id uuid NOT NULL, order_id integer NOT NULL,
    outcome text NOT NULL);
"""


def charge_topics(prefix: str) -> tuple[str, str]:
    """The payments service's command topic and billing's reply topic."""
    return f"{prefix}.payments.commands", f"{prefix}.billing.replies"


def billing_consumer(engine: Engine, bootstrap: str, topics: list[str],
                     charges: tuple[str, str]) -> Consumer:
    payments_topic, replies_topic = charges
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
        status = "CHARGING" if message.event_type == "OrderApproved" else "VOID"
        session.execute(text("UPDATE invoices SET status = :s WHERE order_id = :order"),
                        {"s": status, "order": order["orderId"]})
        if status == "CHARGING":
            # In this transaction: the command exists if and only if the invoice changed.
            commands.send(session, "ChargeCard", {"orderId": order["orderId"],
                                                  "cents": order["totalCents"]},
                          destination=payments_topic, reply_to=replies_topic,
                          aggregate_type="Order", aggregate_id=str(order["orderId"]))

    @consumer.reply("ChargeCard")
    def settle_charge(session: Session, reply: commands.Reply) -> None:
        order = int(reply.message.aggregate_id)  # a reply has its command's key: the order id
        session.execute(
            text("INSERT INTO billing_replies VALUES (:id, :command, :order, :outcome)"),
            {"id": reply.message.id, "command": reply.command_id, "order": order,
             "outcome": reply.outcome})
        session.execute(text("UPDATE invoices SET status = :s WHERE order_id = :order"),
                        {"s": "CHARGED" if reply.ok else "PAYMENT_FAILED", "order": order})

    return consumer


def payments_consumer(engine: Engine, bootstrap: str, commands_topic: str) -> Consumer:
    """The payments service (here in billing's database): handles ChargeCard commands; its
    reply goes through the outbox in the same transaction as the payment row."""
    consumer = Consumer(
        name="payments",
        kafka={"bootstrap.servers": bootstrap, "auto.offset.reset": "earliest"},
        topics=[commands_topic],
        db=engine,
    )

    @consumer.command("ChargeCard")
    def charge_card(session: Session, message: Message) -> object:
        charge = message.json()
        if charge["cents"] % 13 == 0:  # the demo's declined cards
            return commands.Failure("card declined", {"orderId": charge["orderId"]})
        session.execute(text("INSERT INTO payments VALUES (:id, :order, :cents)"),
                        {"id": message.id, "order": charge["orderId"], "cents": charge["cents"]})
        return {"orderId": charge["orderId"], "charged": charge["cents"]}

    return consumer
