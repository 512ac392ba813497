"""The run's plots as SVG, written next to its JSON: the drain timeline of each source and the
commit-to-Kafka latency percentiles per offered rate. Plain SVG text (no plotting library: the
suite needs nothing beyond the project's dev dependencies), readable in any browser."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

WIDTH, HEIGHT = 760, 300
LEFT, RIGHT, TOP, BOTTOM = 78, 190, 34, 44  # margins: axis labels left, legend right
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
DASHES = ("", "6,3", "2,3", "8,3,2,3")


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float]]
    colour: str
    dash: str = ""


def _nice_step(span: float, ticks: int = 5) -> float:
    """A round tick step (1, 2 or 5 times a power of ten) giving about `ticks` ticks."""
    raw = span / ticks if span > 0 else 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1.0, 2.0, 5.0, 10.0) if m * power >= raw)


def _number(value: float) -> str:
    if abs(value) >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if abs(value) >= 1_000:
        return f"{value / 1_000:g}k"
    return f"{value:g}"


def chart(
    title: str, x_label: str, y_label: str, series: Sequence[Series],
    *, x_ticks: Sequence[tuple[float, str]] | None = None, x_pad: float = 0.0, top: int = 0,
) -> tuple[str, int]:
    """One line chart as an SVG group at vertical offset `top`; returns (markup, its height).
    `x_pad` widens the x range on both sides (categorical axes: the points stay off the edge)."""
    points = [p for s in series for p in s.points]
    x_max = max((x for x, _ in points), default=1.0) + x_pad
    x_min = min((x for x, _ in points), default=0.0) - x_pad
    x_min = min(x_min, 0.0) if x_ticks is None else x_min
    y_step = _nice_step(max((y for _, y in points), default=1.0))
    y_max = y_step * max(1, math.ceil(max((y for _, y in points), default=1.0) / y_step))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x_min) / ((x_max - x_min) or 1.0) * plot_w

    def sy(y: float) -> float:
        return top + TOP + plot_h - y / y_max * plot_h

    out = [f'<text x="{LEFT}" y="{top + 20}" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{LEFT}" y="{top + TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
           f'stroke="#888"/>']
    tick = 0.0
    while tick <= y_max + y_step / 2:
        y = sy(tick)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="#ddd"/><text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f'{_number(tick)}</text>')
        tick += y_step
    if x_ticks is None:
        step = _nice_step(x_max - x_min)
        x_ticks = [(x_min + i * step, _number(x_min + i * step))
                   for i in range(int((x_max - x_min) / step) + 1)]
    for x, label in x_ticks:
        out.append(f'<text x="{sx(x):.1f}" y="{top + TOP + plot_h + 16}" text-anchor="middle">'
                   f'{escape(label)}</text>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{top + HEIGHT - 8}" text-anchor="middle">'
               f'{escape(x_label)}</text>')
    out.append(f'<text transform="translate(16,{top + TOP + plot_h / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(y_label)}</text>')
    for index, s in enumerate(series):
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s.points)
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        out.append(f'<polyline class="series" fill="none" stroke="{s.colour}" stroke-width="1.6"'
                   f'{dash} points="{path}"><title>{escape(s.label)}</title></polyline>')
        for x, y in s.points if len(s.points) < 30 else []:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{s.colour}"/>')
        ly = top + TOP + 10 + 16 * index
        out.append(f'<line x1="{WIDTH - RIGHT + 12}" x2="{WIDTH - RIGHT + 34}" y1="{ly}" '
                   f'y2="{ly}" stroke="{s.colour}" stroke-width="2"{dash}/>'
                   f'<text x="{WIDTH - RIGHT + 40}" y="{ly + 4}">{escape(s.label)}</text>')
    return "\n".join(out), HEIGHT


def document(charts: Sequence[tuple[str, int]], caption: str) -> str:
    height = sum(h for _, h in charts) + 24
    body = "\n".join(markup for markup, _ in charts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'font-family="sans-serif" font-size="11">\n<rect width="100%" height="100%" '
            f'fill="white"/>\n{body}\n<text x="{LEFT}" y="{height - 8}" fill="#555">'
            f'{escape(caption)}</text>\n</svg>\n')


def _caption(results: dict[str, Any]) -> str:
    machine = results.get("machine", {})
    return (f"{results.get('started_at')}, commit {str(machine.get('git_commit'))[:10]}, "
            f"{machine.get('cpus')} cpus, load before/after {results.get('loadavg_before')} / "
            f"{results.get('loadavg_after')}")


def drain_svg(results: dict[str, Any]) -> str | None:
    """Events in Kafka and the rate between samples, against seconds since the relay started;
    one line per source (the drain's `timeline`). None when no drain has a timeline."""
    totals: list[Series] = []
    rates: list[Series] = []
    for index, (name, result) in enumerate(results.get("sources", {}).items()):
        samples = result.get("drain", {}).get("drain", {}).get("timeline", {}).get("samples")
        if not samples:
            continue
        colour = COLOURS[index % len(COLOURS)]
        totals.append(Series(name, [(s[0], s[1]) for s in samples], colour))
        rate = [((a[0] + b[0]) / 2, (b[1] - a[1]) / (b[0] - a[0]))
                for a, b in itertools.pairwise(samples) if b[0] > a[0]]
        if rate:
            rates.append(Series(name, rate, colour))
    if not totals:
        return None
    charts = [chart("Drain: events acknowledged by Kafka", "seconds since the relay started",
                    "events in Kafka", totals)]
    if rates:
        charts.append(chart("Drain rate between samples", "seconds since the relay started",
                            "events/s", rates, top=HEIGHT))
    return document(charts, _caption(results))


def latency_svg(results: dict[str, Any]) -> str | None:
    """Commit-to-Kafka p50/p95/p99/max per offered rate, one colour per source, one dash per
    percentile. The rates are spaced evenly (they usually grow by factors). None without data."""
    offered = sorted({rate["offered_rate"]
                      for result in results.get("sources", {}).values()
                      for rate in result.get("latency", {}).get("rates", [])})
    if not offered:
        return None
    position = {rate: float(i) for i, rate in enumerate(offered)}
    series: list[Series] = []
    for index, (name, result) in enumerate(results.get("sources", {}).items()):
        rates = result.get("latency", {}).get("rates", [])
        for dash, key in zip(DASHES, ("p50_ms", "p95_ms", "p99_ms", "max_ms"), strict=True):
            points = [(position[r["offered_rate"]], r[key]) for r in rates
                      if r.get(key) is not None]
            if points:
                series.append(Series(f"{name} {key.removesuffix('_ms')}", points,
                                     COLOURS[index % len(COLOURS)], dash))
    if not series:
        return None
    ticks = [(position[rate], f"{rate:,.0f}/s") for rate in offered]
    markup = chart("Commit-to-Kafka latency per offered rate", "offered rate (events/s)",
                   "latency (ms)", series, x_ticks=ticks, x_pad=0.3)
    return document([markup], _caption(results))
