"""`python -m demo`: the whole pattern live, on the local stack, with a verdict at the end.

An order service writes orders and their events in one transaction (some roll back on purpose),
the relay publishes them to Kafka, a billing service applies each once and charges each
approved order with a ChargeCard command to a payments service, whose reply (through a second
relay, on billing's database) settles the invoice. Half-way the orders relay is killed with
SIGKILL and restarted. The verdict, computed from the databases: every committed event applied
exactly once, no rolled-back event applied, each order's events applied in order, and every
approved order charged with exactly one reply applied, none for the others.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from psycopg import sql
from pymongo import MongoClient
from sqlalchemy import create_engine, text

from demo.billing import SCHEMA as BILLING_SCHEMA
from demo.billing import billing_consumer, charge_topics, payments_consumer
from demo.order_service import Base, OrderService, PaymentDeclined
from demo.order_service_mongo import MongoOrderService

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("postgres-wal", "postgres-poll", "mongo-poll", "mongo-stream")


@dataclass
class Tally:
    committed: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (order, version)
    rolled_back: set[str] = field(default_factory=set)
    approved: set[int] = field(default_factory=set)  # orders billing must charge
    lock: threading.Lock = field(default_factory=threading.Lock)


def stack_settings(mongo: bool) -> dict[str, str]:
    names = ("OUTBOX_DB_URL", "OUTBOX_KAFKA_BOOTSTRAP") + (("OUTBOX_MONGO_URL",) if mongo else ())
    if all(os.environ.get(n) for n in names):
        return {n: os.environ[n] for n in names}
    from deploy.local import stack

    return stack.up(names=["postgres", "kafka"] + (["mongo"] if mongo else []))


def mongo_database_url(url: str, name: str) -> str:
    """The MongoDB URL with its database part replaced by `name`."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def recreate_database(admin_url: str, name: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        for (slot,) in admin.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = %s", [name]
        ).fetchall():
            admin.execute("SELECT pg_drop_replication_slot(%s)", [slot])
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return psycopg.conninfo.make_conninfo(admin_url, dbname=name)


def sqlalchemy_url(conninfo: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(conninfo)
    return (f"postgresql+psycopg://{info['user']}:{info['password']}@{info['host']}:"
            f"{info['port']}/{info['dbname']}")


def outbox_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "relay.cli", *args], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Relay:
    """The relay as a real process (so it can be SIGKILLed), with its metrics port."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log = args, log
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.published_before = 0  # by earlier (killed) processes

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relay.cli", "relay", *self.args,
                 "--metrics-port", str(self.port), "--log-format", "json"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def metrics(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1) as r:
                body = r.read().decode()
        except OSError:
            return {}
        values: dict[str, float] = {}
        for line in body.splitlines():
            if line.startswith("outbox_") and " " in line:
                name, value = line.rsplit(" ", 1)
                base = name.split("{", 1)[0]
                values[base] = values.get(base, 0.0) + float(value)
        return values

    def published(self) -> int:
        return self.published_before + int(self.metrics().get("outbox_events_published_total", 0))

    def kill(self) -> None:
        assert self.process is not None
        self.published_before = self.published()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


def write_orders(
    service: OrderService | MongoOrderService, tally: Tally, stop: threading.Event, rate: float
) -> None:
    """Place orders and settle them; about one settlement in six fails its payment check."""
    rng = random.Random(7)
    pending: list[int] = []
    while not stop.is_set():
        event = service.place_order(rng.choice(["ada", "grace", "linus"]), rng.randint(100, 9999))
        with tally.lock:
            tally.committed[str(event.id)] = (int(event.aggregate_id), 1)
        pending.append(int(event.aggregate_id))
        if len(pending) > 5:
            order_id = pending.pop(rng.randrange(len(pending)))
            try:
                approving = rng.random() >= 0.25
                if approving:
                    event = service.approve(order_id, payment_ok=rng.random() > 0.18)
                else:
                    event = service.cancel(order_id)
                with tally.lock:
                    tally.committed[str(event.id)] = (order_id, 2)
                    if approving:
                        tally.approved.add(order_id)
            except PaymentDeclined:
                with tally.lock:
                    tally.rolled_back.add(f"order {order_id} approval")
                pending.append(order_id)  # still pending: settle it later
        stop.wait(1.0 / rate)


def billing_view(billing_url: str) -> list[tuple[str, int, int]]:
    with psycopg.connect(billing_url) as conn:
        return [(str(i), o, v) for i, o, v in conn.execute(
            "SELECT event_id, order_id, version FROM billing_applied ORDER BY seq").fetchall()]


def charges_view(billing_url: str) -> tuple[int, list[tuple[int, str]], list[tuple[int, str]]]:
    """Charges sent (ChargeCard commands), the replies applied (order, outcome) and the
    invoices that were charged (order, status)."""
    with psycopg.connect(billing_url) as conn:
        row = conn.execute("SELECT count(*) FROM invoices"
                           " WHERE status IN ('CHARGING', 'CHARGED', 'PAYMENT_FAILED')").fetchone()
        replies = [(o, r) for o, r in conn.execute(
            "SELECT order_id, outcome FROM billing_replies").fetchall()]
        invoices = [(o, s) for o, s in conn.execute(
            "SELECT order_id, status FROM invoices WHERE status IN"
            " ('CHARGING', 'CHARGED', 'PAYMENT_FAILED')").fetchall()]
    return (int(row[0]) if row else 0), replies, invoices


def charge_verdict(tally: Tally, replies: list[tuple[int, str]],
                   invoices: list[tuple[int, str]]) -> list[str]:
    problems = []
    replied = [order for order, _ in replies]
    if len(replied) != len(set(replied)):
        problems.append(f"{len(replied) - len(set(replied))} charge replies were applied twice")
    if set(replied) - tally.approved:
        problems.append(f"{len(set(replied) - tally.approved)} orders got a charge reply "
                        "without a committed approval")
    if tally.approved - set(replied):
        problems.append(f"{len(tally.approved - set(replied))} approved orders got no charge "
                        "reply applied")
    outcomes = dict(replies)
    wrong = [order for order, status in invoices
             if status != {"success": "CHARGED", "failure": "PAYMENT_FAILED"}.get(
                 outcomes.get(order, ""), "CHARGING")]
    if wrong:
        problems.append(f"{len(wrong)} invoices do not match their charge reply")
    return problems


def backlog(relay: Relay) -> str:
    metrics = relay.metrics()
    if "outbox_slot_retained_wal_bytes" in metrics:
        return f"slot retains {int(metrics['outbox_slot_retained_wal_bytes']) // 1024} KiB WAL"
    if "outbox_backlog_events" in metrics:
        return f"backlog {int(metrics['outbox_backlog_events'])}"
    return "relay restarting"


def verdict(tally: Tally, applied: list[tuple[str, int, int]]) -> list[str]:
    problems = []
    applied_ids = [event_id for event_id, _, _ in applied]
    missing = set(tally.committed) - set(applied_ids)
    extra = set(applied_ids) - set(tally.committed)
    twice = len(applied_ids) - len(set(applied_ids))
    if missing:
        problems.append(f"{len(missing)} committed events were never applied")
    if extra:
        problems.append(f"{len(extra)} applied events were never committed (rolled back?)")
    if twice:
        problems.append(f"{twice} events were applied twice")
    last: dict[int, int] = {}
    for _, order, version in applied:
        if version <= last.get(order, 0):
            problems.append(f"order {order}: version {version} applied after {last[order]}")
        last[order] = version
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--source", choices=SOURCES, default=SOURCES[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of writing")
    parser.add_argument("--rate", type=float, default=40.0, help="orders per second")
    parser.add_argument("--prefix", default="outbox_demo", help="names of the demo databases")
    args = parser.parse_args(argv)

    run = uuid.uuid4().hex[:6]
    home = REPO / ".local" / "demo"
    home.mkdir(parents=True, exist_ok=True)
    on_mongo = args.source.startswith("mongo")
    settings = stack_settings(on_mongo)
    admin, bootstrap = settings["OUTBOX_DB_URL"], settings["OUTBOX_KAFKA_BOOTSTRAP"]
    print(f"== outbox-relay demo (source {args.source}, run {run}) ==")
    orders_url = recreate_database(admin, f"{args.prefix}_orders")
    billing_url = recreate_database(admin, f"{args.prefix}_billing")
    for url in (orders_url, billing_url):
        outbox_cli("migrate", "up", "--db", url)
    topic = f"demo-{run}.Order"
    charges = charge_topics(f"demo-{run}")
    kafka_admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in kafka_admin.create_topics(
            [NewTopic(name, num_partitions=3, replication_factor=1)
             for name in (topic, *charges)]).values():
        future.result(30)

    orders_engine = create_engine(sqlalchemy_url(orders_url), pool_size=2)
    service: OrderService | MongoOrderService = OrderService(orders_engine)
    billing_engine = create_engine(sqlalchemy_url(billing_url), pool_size=2)
    Base.metadata.create_all(orders_engine)
    with billing_engine.begin() as conn:
        conn.execute(text(BILLING_SCHEMA))
    relay_args = ["--source", args.source, "--db", orders_url, "--kafka", bootstrap,
                  "--topic-template", f"demo-{run}.{{aggregate_type}}"]
    wal_names: list[str] = []
    if on_mongo:
        mongo_url = mongo_database_url(settings["OUTBOX_MONGO_URL"], f"{args.prefix}_orders")
        mongo_client: MongoClient[Any] = MongoClient(mongo_url)
        mongo_client.drop_database(f"{args.prefix}_orders")
        mongo_db = mongo_client.get_default_database()
        mongo_db.create_collection("orders")  # before any transaction writes to it
        service = MongoOrderService(mongo_db)
        relay_args = ["--source", args.source, "--mongo", mongo_url, "--collections", "orders",
                      "--kafka", bootstrap, "--topic-template", f"demo-{run}.{{aggregate_type}}"]
    if args.source == "postgres-wal":
        # Slots are cluster-wide: name them after the demo's databases.
        wal_names += ["--slot", args.prefix, "--publication", args.prefix]
        outbox_cli("slot", "create", "--db", orders_url, *wal_names)
        relay_args += wal_names
    relay = Relay(relay_args, home / "relay.log")
    # Billing's own relay publishes its commands and the payments service's replies.
    billing_relay = Relay(["--source", "postgres-poll", "--db", billing_url, "--kafka", bootstrap,
                           "--poll-interval", "0.2"], home / "billing-relay.log")
    consumer = billing_consumer(billing_engine, bootstrap, [topic, charges[1]], charges)
    payments = payments_consumer(billing_engine, bootstrap, charges[0])
    tally, stop_writing = Tally(), threading.Event()
    writer = threading.Thread(target=write_orders, name="orders",
                              args=(service, tally, stop_writing, args.rate))
    consuming = threading.Thread(target=consumer.run, name="billing", daemon=True)
    paying = threading.Thread(target=payments.run, name="payments", daemon=True)
    print(f"orders db, billing db, topic {topic}; relay log {relay.log}")
    relay.start()
    billing_relay.start()
    consuming.start()
    paying.start()
    writer.start()
    started, killed = time.monotonic(), False
    deadline = started + args.duration + 90
    try:
        while True:
            elapsed = time.monotonic() - started
            if not killed and elapsed > args.duration / 2:
                relay.kill()
                killed = True
                print(f"[{elapsed:5.1f}s] relay killed with SIGKILL; restarting it")
                relay.start()
            if elapsed > args.duration and not stop_writing.is_set():
                stop_writing.set()
                writer.join()
            stats = consumer.stats
            with tally.lock:
                written, declined = len(tally.committed), len(tally.rolled_back)
            applied = len(billing_view(billing_url))
            charged, replies, _ = charges_view(billing_url)
            failed = sum(1 for _, outcome in replies if outcome == "failure")
            print(f"[{elapsed:5.1f}s] written {written} (rolled back {declined})  "
                  f"published {relay.published()}  applied {applied}  "
                  f"duplicates skipped {stats.duplicates}  {backlog(relay)}  "
                  f"charges {charged}, replies applied {len(replies)} ({failed} declined)",
                  flush=True)
            if stop_writing.is_set() and applied >= written and len(replies) >= charged:
                break
            if time.monotonic() > deadline:
                print("timed out waiting for the billing service to catch up")
                break
            time.sleep(1.0)
    finally:
        stop_writing.set()
        if writer.is_alive():
            writer.join()
        relay_exit = relay.stop()
        billing_relay_exit = billing_relay.stop()
        consumer.stop()
        payments.stop()
        consuming.join(30)
        paying.join(30)
        if args.source == "postgres-wal":  # a slot left behind would keep WAL forever
            outbox_cli("slot", "drop", "--db", orders_url, *wal_names)
    problems = verdict(tally, billing_view(billing_url))
    _, replies, invoices = charges_view(billing_url)
    problems += charge_verdict(tally, replies, invoices)
    if relay_exit != 0:
        problems.append(f"the relay exited with {relay_exit} on SIGTERM")
    if billing_relay_exit != 0:
        problems.append(f"billing's relay exited with {billing_relay_exit} on SIGTERM")
    print(f"\ncommitted events {len(tally.committed)}, rolled back {len(tally.rolled_back)}, "
          f"applied {len(billing_view(billing_url))}, duplicates skipped "
          f"{consumer.stats.duplicates}; approved orders charged {len(tally.approved)}, "
          f"charge replies applied {len(replies)}")
    if problems:
        print("VERDICT: FAILED\n  " + "\n  ".join(problems))
        return 1
    print("VERDICT: OK - every committed event applied exactly once, in order per order; "
          "no rolled-back event applied; nothing lost across the SIGKILL; every approved order "
          "charged by command, its reply applied exactly once")
    orders_engine.dispose()
    billing_engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
