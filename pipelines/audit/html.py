"""The HTML building blocks of the reports: one self-contained page (inline CSS, inline SVG),
tables, image rows and notes. Every piece of user or corpus text is escaped here.

Images are referenced by paths relative to the page, so the report folder can be copied anywhere
(another disk, a bucket, a static web server) and still shows them.
"""

from __future__ import annotations

from html import escape
from typing import Any

CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 16px 24px 48px; color: #1b1b1b; line-height: 1.4; }
h1 { font-size: 1.6rem; margin: 0.2rem 0; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05rem; margin: 1rem 0 0.4rem; }
.sub { color: #555; margin: 0 0 0.6rem; } .mono, code { font-family: ui-monospace, Menlo, monospace; font-size: 0.85em; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f4f6f8; } td.l, th.l { text-align: left; }
td small { color: #666; } tr:nth-child(even) td { background: #fafbfc; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 10px; margin: 6px 0; }
.warn { background: #fdecea; border-left: 4px solid #d62728; padding: 6px 10px; margin: 6px 0; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.grid { display: flex; flex-direction: column; gap: 10px; }
.imgrow { display: flex; gap: 6px; align-items: flex-start; flex-wrap: wrap; }
.imgrow .who { width: 130px; font-size: 0.8rem; color: #444; overflow-wrap: break-word; }
figure { margin: 0; text-align: center; font-size: 0.75rem; color: #333; width: 128px; }
figcaption { overflow-wrap: break-word; }
figure img { width: 128px; height: 128px; object-fit: contain; background: #eee; display: block; }
figure img.guide { image-rendering: pixelated; }
details pre { max-height: 420px; overflow: auto; background: #f6f8fa; padding: 8px; font-size: 0.8rem; }
nav a { margin-right: 12px; }
"""


def page(title: str, subtitle: str, body: str, nav: list[tuple[str, str]]) -> str:
    links = "".join(f'<a href="#{escape(anchor)}">{escape(label)}</a>' for anchor, label in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1><p class=\"sub\">{subtitle}</p>"
        f"<nav>{links}</nav>{body}</body></html>\n"
    )


def section(anchor: str, title: str, body: str, intro: str = "") -> str:
    lead = f"<p>{intro}</p>" if intro else ""
    return f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>{lead}{body}</section>'


def table(headers: list[str], rows: list[list[str]], left: int = 1, table_id: str = "") -> str:
    """Cells are HTML already (use `text` for plain strings); the first `left` columns align left."""
    ident = f' id="{escape(table_id)}"' if table_id else ""
    head = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>" for i, h in enumerate(headers))
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""  # key/value tables have no header
    body = "".join(
        "<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table{ident}>{thead}<tbody>{body}</tbody></table>"


def text(value: Any) -> str:
    return escape("" if value is None else str(value))


def number(value: float | None, digits: int = 3) -> str:
    return "&ndash;" if value is None else f"{value:.{digits}f}"


def interval(stats: dict[str, Any] | None, digits: int = 3) -> str:
    """'mean [low, high]' of a `mean_interval` result."""
    if not stats or stats.get("mean") is None:
        return "&ndash;"
    out = f"{stats['mean']:.{digits}f}"
    if stats.get("ci_low") is not None:
        out += f" <small>[{stats['ci_low']:.{digits}f}, {stats['ci_high']:.{digits}f}]</small>"
    if stats.get("n_infinite"):
        out += f" <small>(+{stats['n_infinite']} identical)</small>"
    return out


def figure(src: str, caption: str, guide: bool = False) -> str:
    """A 128 px thumbnail that links its full-size image; `caption` is HTML already. Captions and labels
    wrap at word boundaries (`overflow-wrap: break-word` breaks inside a word only when one word is
    wider than the column, as a long shard path is)."""
    cls = ' class="guide"' if guide else ""
    return (f'<figure><a href="{escape(src)}" target="_blank"><img src="{escape(src)}" alt="{escape(caption)}"'
            f'{cls} width="128" height="128"></a><figcaption>{caption}</figcaption></figure>')


def image_row(label: str, figures: list[str]) -> str:
    return f'<div class="imgrow"><div class="who">{label}</div>{"".join(figures)}</div>'


def notes(items: list[str], cls: str = "note") -> str:
    return "".join(f'<div class="{cls}">{escape(item)}</div>' for item in items)


def details(summary: str, content: str) -> str:
    return f"<details><summary>{escape(summary)}</summary><pre>{escape(content)}</pre></details>"
