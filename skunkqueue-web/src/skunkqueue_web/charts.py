"""Server-rendered SVG charts: no chart library in the page, nothing to load."""

from __future__ import annotations

import datetime as dt
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 720, 160
LEFT, BOTTOM, TOP, RIGHT = 44, 22, 10, 22


def _nice_max(value: int) -> int:
    """The smallest 1/2/5 x 10^k at or above ``value``, so the axis reads cleanly."""
    if value <= 2:
        return 2  # keeps the half-way label a whole number
    step = 1
    while True:
        for m in (1, 2, 5):
            if m * step >= value:
                return m * step
        step *= 10


def minute_bars(minutes: list[int], series: list[tuple[str, str, list[int]]], *, title: str) -> Markup:
    """Stacked bars per minute; ``series`` is (label, css class, values) bottom first."""
    n = len(minutes)
    totals = [sum(values[i] for _, _, values in series) for i in range(n)]
    top = _nice_max(max(totals, default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - BOTTOM - TOP
    slot = plot_w / max(n, 1)
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>"]
    for frac in (0, 0.5, 1):
        y = TOP + plot_h * (1 - frac)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{int(top * frac)}</text>')
    for i, minute in enumerate(minutes):
        x = LEFT + i * slot
        base = float(TOP + plot_h)
        label = dt.datetime.fromtimestamp(minute * 60, dt.timezone.utc).strftime("%H:%M")
        tip = ", ".join(f"{name} {values[i]}" for name, _, values in series)
        for _, css, values in series:
            if values[i]:
                h = plot_h * values[i] / top
                base -= h
                parts.append(f'<rect class="{css}" x="{x + 1:.1f}" y="{base:.1f}" width="{max(slot - 2, 1):.1f}" '
                             f'height="{h:.1f}"><title>{label}: {escape(tip)}</title></rect>')
        if i % 10 == 0 or i == n - 1:
            parts.append(f'<text class="axis" x="{x + slot / 2:.1f}" y="{HEIGHT - 6}" '
                         f'text-anchor="middle">{label}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
