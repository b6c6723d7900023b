"""Small, dependency-free SVG plots for the reports (inline in the HTML: nothing to fetch).

Each function returns one `<svg>` element as a string, sized in CSS pixels, with a title, axis
ticks and labels, so a report reads the same in any browser, offline, or copied to S3.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
_FONT = 'font-family="system-ui, sans-serif" font-size="11"'
_MARGIN = (46, 12, 28, 38)  # left, right, top, bottom


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(count, 1)
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    start = math.floor(low / step) * step
    return [round(start + i * step, 10) for i in range(math.ceil((high - start) / step) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


class _Frame:
    """Maps data coordinates into a plot area and draws its axes."""

    def __init__(self, width: int, height: int, x_range: tuple[float, float], y_range: tuple[float, float]) -> None:
        self.width, self.height = width, height
        left, right, top, bottom = _MARGIN
        self.box = (left, top, width - right, height - bottom)
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range if y_range[1] > y_range[0] else (y_range[0], y_range[0] + 1.0)

    def x(self, value: float) -> float:
        left, _, right, _ = self.box
        return left + (value - self.x0) / (self.x1 - self.x0 or 1.0) * (right - left)

    def y(self, value: float) -> float:
        _, top, _, bottom = self.box
        return bottom - (value - self.y0) / (self.y1 - self.y0) * (bottom - top)

    def axes(self, title: str, x_label: str, y_label: str, x_ticks: list[tuple[float, str]],
             y_ticks: list[float]) -> list[str]:
        left, top, right, bottom = self.box
        parts = [f'<text x="{self.width / 2:.1f}" y="15" text-anchor="middle" font-weight="600">{escape(title)}</text>',
                 f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>',
                 f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#333"/>']
        for value, label in x_ticks:
            px = self.x(value)
            parts.append(f'<line x1="{px:.1f}" y1="{bottom}" x2="{px:.1f}" y2="{bottom + 4}" stroke="#333"/>'
                         f'<text x="{px:.1f}" y="{bottom + 15}" text-anchor="middle">{escape(label)}</text>')
        for value in y_ticks:
            py = self.y(value)
            if top - 1 <= py <= bottom + 1:
                parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#eee"/>'
                             f'<text x="{left - 4}" y="{py + 4:.1f}" text-anchor="end">{_fmt(value)}</text>')
        parts.append(f'<text x="{(left + right) / 2:.1f}" y="{self.height - 4}" text-anchor="middle">'
                     f'{escape(x_label)}</text>')
        parts.append(f'<text transform="translate(11,{(top + bottom) / 2:.1f}) rotate(-90)" '
                     f'text-anchor="middle">{escape(y_label)}</text>')
        return parts

    def svg(self, parts: list[str], label: str) -> str:
        body = "".join(parts)
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}" role="img" aria-label="{escape(label)}" {_FONT}>'
                f"{body}</svg>")


def histogram(values: np.ndarray, edges: np.ndarray, title: str, x_label: str, color: str = PALETTE[0],
              width: int = 280, height: int = 170) -> str:
    """Bars of `values` counted into the bins `edges` (shared edges make panels comparable)."""
    finite = values[np.isfinite(values)]
    counts, _ = np.histogram(np.clip(finite, edges[0], edges[-1]), bins=edges)
    frame = _Frame(width, height, (float(edges[0]), float(edges[-1])), (0.0, float(max(counts.max(initial=0), 1))))
    ticks = [(t, _fmt(t)) for t in nice_ticks(float(edges[0]), float(edges[-1]), 4) if edges[0] <= t <= edges[-1]]
    peak = float(max(counts.max(initial=0), 1))
    y_ticks = [t for t in nice_ticks(0, peak, 4) if float(t).is_integer()]  # counts: whole numbers only
    parts = frame.axes(title, x_label, "images", ticks, y_ticks)
    for count, lo, hi in zip(counts, edges[:-1], edges[1:]):
        if count:
            x, top = frame.x(float(lo)), frame.y(float(count))
            parts.append(f'<rect x="{x + 0.5:.1f}" y="{top:.1f}" width="{max(frame.x(float(hi)) - x - 1, 1):.1f}" '
                         f'height="{frame.y(0) - top:.1f}" fill="{color}"><title>{_fmt(lo)}-{_fmt(hi)}: '
                         f"{int(count)}</title></rect>")
    return frame.svg(parts, title)


def series_plot(series: dict[str, list[dict[str, float | None]]], categories: list[str], title: str,
                x_label: str, y_label: str, width: int = 520, height: int = 260) -> str:
    """Lines over categorical x positions, with 95% interval whiskers; points carry x/mean/lo/hi."""
    values = [v for pts in series.values() for p in pts for v in (p["mean"], p["lo"], p["hi"]) if v is not None]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (high - low) * 0.1 or 1.0
    frame = _Frame(width, height, (-0.5, len(categories) - 0.5), (low - pad, high + pad))
    parts = frame.axes(title, x_label, y_label, [(i, c) for i, c in enumerate(categories)],
                       nice_ticks(low - pad, high + pad, 5))
    for n, (name, points) in enumerate(series.items()):
        color = PALETTE[n % len(PALETTE)]
        coords = [(frame.x(p["x"]), frame.y(p["mean"]), p) for p in points if p["mean"] is not None]
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in coords)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y, p in coords:
            if p["lo"] is not None and p["hi"] is not None:
                parts.append(f'<line x1="{x:.1f}" y1="{frame.y(p["lo"]):.1f}" x2="{x:.1f}" y2="{frame.y(p["hi"]):.1f}" '
                             f'stroke="{color}"/>')
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"><title>{escape(name)}: '
                         f'{p["mean"]:.2f}</title></circle>')
        legend_y = frame.box[1] + 12 + 14 * n
        parts.append(f'<rect x="{frame.box[2] - 150}" y="{legend_y - 8}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{frame.box[2] - 136}" y="{legend_y + 1}">{escape(name)}</text>')
    return frame.svg(parts, title)


def log_ticks(top: float) -> list[tuple[float, str]]:
    """Ticks at the powers of ten from 10^0 to past 10^top, as (log10 value, label): 1, 10, 100, 1k..."""
    return [(float(k), _fmt(10.0**k)) for k in range(0, int(math.floor(top)) + 1)]


def rank_frequency(counts: np.ndarray, title: str, width: int = 520, height: int = 220) -> str:
    """Code counts sorted from most to least used, on log-log axes (log rank, log count): how evenly a
    codebook is used. A linear rank axis draws 23 used codes of 4096 as a 1-2 px line; on a log axis
    the used codes take most of the width and a Zipf-like tail reads as a straight line."""
    ordered = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    used = ordered[ordered > 0]
    top = math.log10(max(float(used[0]) if used.size else 1.0, 1.0))
    right = math.log10(max(ordered.size, 2))  # rank 1 at x=0, the last code at log10(size)
    frame = _Frame(width, height, (0.0, right), (0.0, top + 0.2))
    parts = frame.axes(title, "code rank, most used first (log scale)", "count (log scale)",
                       log_ticks(right), [])
    parts += _log_y_ticks(frame, top + 0.2)
    step = max(1, used.size // 400)  # at most ~400 vertices, whatever the codebook size
    points = " ".join(f"{frame.x(math.log10(i + 1)):.1f},{frame.y(math.log10(used[i])):.1f}"
                      for i in [*range(0, used.size, step), used.size - 1][: used.size])
    if used.size:
        parts.append(f'<polyline class="rank-line" points="{points}" fill="none" stroke="{PALETTE[0]}" '
                     f'stroke-width="2"/>')
    if used.size < ordered.size:
        dead_x = frame.x(math.log10(used.size + 1))
        parts.append(f'<line x1="{dead_x:.1f}" y1="{frame.box[1]}" x2="{dead_x:.1f}" y2="{frame.box[3]}" '
                     f'stroke="{PALETTE[1]}" stroke-dasharray="4 3"/><text x="{dead_x + 4:.1f}" y="{frame.box[1] + 12}" '
                     f'fill="{PALETTE[1]}">{ordered.size - used.size} dead codes from rank {used.size + 1}</text>')
    return frame.svg(parts, title)


def _log_y_ticks(frame: _Frame, top: float) -> list[str]:
    left, _, right, _ = frame.box
    parts = []
    for value, label in log_ticks(top):
        py = frame.y(value)
        parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#eee"/>'
                     f'<text class="ytick" x="{left - 4}" y="{py + 4:.1f}" text-anchor="end">{label}</text>')
    return parts


def line_plot(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str,
              log_y: bool = False, width: int = 520, height: int = 240) -> str:
    """Lines over a numeric x axis (loss curves: step -> value); `log_y` plots log10 of y, labelled in y."""
    def ty(v: float) -> float:
        return math.log10(v) if log_y else v

    points = {name: [(float(x), ty(float(y))) for x, y in pts if math.isfinite(y) and (y > 0 or not log_y)]
              for name, pts in series.items()}
    xs = [x for pts in points.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in points.values() for _, y in pts] or [0.0, 1.0]
    low, high = min(ys), max(ys)
    pad = (high - low) * 0.05 or 1.0
    frame = _Frame(width, height, (min(xs), max(xs)), (low - pad, high + pad))
    x_ticks = [(t, _fmt(t)) for t in nice_ticks(min(xs), max(xs), 5) if min(xs) <= t <= max(xs)]
    if log_y:
        ticks = [t for t in range(math.floor(low - pad), math.ceil(high + pad) + 1)]
        parts = frame.axes(title, x_label, y_label, x_ticks, [])
        left, _, right, _ = frame.box
        for t in ticks:
            py = frame.y(t)
            if frame.box[1] - 1 <= py <= frame.box[3] + 1:
                parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#eee"/>'
                             f'<text x="{left - 4}" y="{py + 4:.1f}" text-anchor="end">{_fmt(10.0 ** t)}</text>')
    else:
        parts = frame.axes(title, x_label, y_label, x_ticks, nice_ticks(low - pad, high + pad, 5))
    for n, (name, pts) in enumerate(points.items()):
        color = PALETTE[n % len(PALETTE)]
        if len(pts) > 1:
            path = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        legend_y = frame.box[1] + 12 + 14 * n
        parts.append(f'<rect x="{frame.box[2] - 150}" y="{legend_y - 8}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{frame.box[2] - 136}" y="{legend_y + 1}">{escape(name)}</text>')
    return frame.svg(parts, title)
