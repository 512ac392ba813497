"""The console's HTML, without I/O: a view of the relay's figures in, a page out.

One page for a person, readable on a phone: no script, nothing fetched from elsewhere (the
chart is inline SVG, the style inline), refreshed by the browser itself (meta refresh). Every
value shown is escaped; the view never holds a password or a connection string.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from html import escape
from urllib.parse import quote

from relay.console.parked import ParkedGroup
from relay.status import human_age, human_bytes

REFRESH_SECONDS = 5
CHART_WIDTH, CHART_HEIGHT = 300, 60

STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:52rem;padding:.75rem;color:#222}
h1{font-size:1.3rem;margin:.2rem 0}h2{font-size:1.1rem;margin:1.2rem 0 .4rem}
h3{font-size:.95rem;margin:.8rem 0 .3rem}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.25rem .9rem;margin:0}
dt{color:#555}dd{margin:0;font-variant-numeric:tabular-nums}
.ok{color:#06752b}.bad{color:#b00020;font-weight:600}.muted{color:#666}
table{border-collapse:collapse;width:100%;font-size:.9rem}
td,th{text-align:left;padding:.2rem .4rem;border-bottom:1px solid #ddd;vertical-align:top}
td{word-break:break-word}svg{max-width:100%;height:auto;background:#f6f8fa}
.notice{padding:.5rem;background:#eef6ee;border:1px solid #9c9}
.refused{padding:.5rem;background:#fbeaea;border:1px solid #d99}
input,button{font-size:1rem;padding:.3rem;margin:.2rem 0}
"""


@dataclass(frozen=True)
class ConsoleView:
    """What the page shows, gathered by relay/console/app.py from the relay's stats."""

    source: str
    leader: bool
    ready: bool
    source_connected: bool
    broker_connected: bool
    stalled: bool
    in_flight: int
    delivered: int
    parked_since_start: int
    restarts: int
    backlog: int | None = None
    oldest_pending_age: float | None = None
    slot_retained_bytes: int | None = None
    slot_over_budget: bool | None = None
    last_published: dt.datetime | None = None
    rates: tuple[float, ...] = ()
    rate_interval: float = 5.0
    parked: tuple[ParkedGroup, ...] | None = None  # None: could not be read (parked_error)
    parked_error: str | None = None
    can_redrive: bool = False
    generated_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


def _state(good: bool, yes: str, no: str) -> str:
    return f'<span class="ok">{yes}</span>' if good else f'<span class="bad">{no}</span>'


def _document(title: str, body: str, *, refresh: bool) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"{meta}<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def chart(rates: tuple[float, ...], interval: float) -> str:
    """Events/s per interval as an inline SVG polyline, newest on the right."""
    minutes = f"{len(rates) * interval / 60:.1f}"
    if not rates:
        return (f'<p class="muted" id="chart">collecting: one point every {interval:g} s</p>')
    top = max(max(rates), 1.0)
    step = CHART_WIDTH / max(len(rates) - 1, 1)
    points = " ".join(
        f"{index * step:.1f},{CHART_HEIGHT - rate / top * (CHART_HEIGHT - 4):.1f}"
        for index, rate in enumerate(rates))
    label = f"events per second over the last {minutes} min; peak {top:,.0f}/s"
    return (
        f'<svg id="chart" role="img" aria-label="{escape(label)}" '
        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" width="{CHART_WIDTH}" '
        f'height="{CHART_HEIGHT}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(label)}</title>"
        f'<polyline fill="none" stroke="#0969da" stroke-width="2" points="{points}"/></svg>'
        f'<p class="muted">now {rates[-1]:,.1f}/s, peak {top:,.1f}/s, '
        f"last {minutes} min, {interval:g} s per point</p>"
    )


def _figures(view: ConsoleView) -> str:
    rows: list[tuple[str, str, str]] = [  # (id, label, html value)
        ("role", "role", _state(view.leader, "active", "standby")),
        ("ready", "ready", _state(view.ready, "yes", "no" + (" (stalled)" if view.stalled
                                                             else ""))),
        ("source-state", f"source ({escape(view.source)})",
         _state(view.source_connected, "connected", "disconnected")),
        ("broker-state", "Kafka", _state(view.broker_connected, "connected", "disconnected")),
        ("backlog", "backlog",
         f"{view.backlog:,} event(s)" if view.backlog is not None else "-"),
        ("oldest", "oldest unacknowledged",
         human_age(view.oldest_pending_age) if view.oldest_pending_age is not None else "-"),
        ("in-flight", "in flight", f"{view.in_flight:,}"),
        ("delivered", "delivered since start", f"{view.delivered:,}"),
        ("parked-count", "parked since start", f"{view.parked_since_start:,}"),
        ("restarts", "restarts", f"{view.restarts:,}"),
    ]
    if view.last_published is not None:
        rows.append(("last-published", "last acknowledged",
                     f"{view.last_published:%Y-%m-%d %H:%M:%S} UTC"))
    if view.slot_retained_bytes is not None:
        retained = human_bytes(view.slot_retained_bytes)
        if view.slot_over_budget is not None:
            retained += " " + _state(not view.slot_over_budget, "(within budget)",
                                     "(OVER --max-slot-wal)")
        rows.append(("slot-wal", "slot retained WAL", retained))
    return "<dl>" + "".join(f'<dt>{label}</dt><dd id="{key}">{value}</dd>'
                            for key, label, value in rows) + "</dl>"


def _parked(view: ConsoleView) -> str:
    if view.parked is None:
        return f'<p class="bad">unavailable: {escape(view.parked_error or "?")}</p>'
    if not view.parked:
        return '<p class="ok" id="parked">no parked events</p>'
    parts = ['<div id="parked">']
    for group in view.parked:
        title = f"key {group.key}" if group.key is not None else "without a key"
        parts.append(f"<h3>{escape(title)} ({len(group.events)})</h3>")
        if view.can_redrive and group.redrive_id is not None:
            parts.append(f'<p><a href="/redrive?id={quote(str(group.redrive_id))}">'
                         "redrive this key's parked events…</a></p>")
        parts.append("<table><tr><th>event</th><th>parked</th><th>reason</th></tr>")
        for line in group.events:
            when = f"{line.parked_at:%Y-%m-%d %H:%M:%S}" if line.parked_at else "-"
            parts.append(f"<tr><td>{escape(line.event_id)}<br><span class=\"muted\">"
                         f"{escape(line.what)}</span></td><td>{when}</td>"
                         f"<td>{escape(line.reason)}</td></tr>")
        parts.append("</table>")
    parts.append("</div>")
    if not view.can_redrive:
        parts.append('<p class="muted">read-only: start the relay with --console-token to '
                     "redrive parked events from here (or use `outbox parked retry`).</p>")
    return "".join(parts)


def render(view: ConsoleView) -> str:
    """The console page."""
    body = (
        f"<h1>outbox relay · {escape(view.source)}</h1>"
        f'<p class="muted">{view.generated_at:%Y-%m-%d %H:%M:%S} UTC, refreshes every '
        f"{REFRESH_SECONDS} s · <a href=\"/metrics\">metrics</a> · "
        "<a href=\"/readyz\">readyz</a></p>"
        f"{_figures(view)}<h2>Events per second</h2>{chart(view.rates, view.rate_interval)}"
        f"<h2>Parked events</h2>{_parked(view)}"
    )
    return _document(f"outbox relay: {view.source}", body, refresh=True)


def redrive_form(group: ParkedGroup) -> str:
    """Asks for the token before re-queueing `group` (no refresh: typing must not be lost)."""
    assert group.redrive_id is not None
    rows = "".join(f"<li>{escape(line.event_id)}: {escape(line.reason)}</li>"
                   for line in group.events)
    body = (
        f"<h1>Redrive key {escape(group.key or '')}</h1>"
        f"<p>Re-queues every parked event of this key, in the order they were parked, ahead of "
        f"its newer events:</p><ul>{rows}</ul>"
        '<form method="post" action="/redrive">'
        f'<input type="hidden" name="id" value="{escape(str(group.redrive_id))}">'
        '<label>console token<br><input type="password" name="token" '
        'autocomplete="current-password" required></label><br>'
        '<button type="submit">Redrive</button></form><p><a href="/">back</a></p>'
    )
    return _document("redrive", body, refresh=False)


def message(title: str, text: str, *, refused: bool) -> str:
    """The answer to a redrive: done, or refused and why."""
    css = "refused" if refused else "notice"
    body = (f"<h1>{escape(title)}</h1><p class=\"{css}\" id=\"result\">{escape(text)}</p>"
            '<p><a href="/">back to the console</a></p>')
    return _document(title, body, refresh=False)
