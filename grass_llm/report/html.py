"""A self-contained HTML attribution report: per query, the response with each token shaded by
its influence, and the most influential training documents, each with its own tokens shaded by
their share of its score when the store holds per-token rows (``query --train-tokens``).

Training data is untrusted: every piece of text goes through ``html.escape`` (a document holding
``<script>`` renders as text). The file has no external resources: inline CSS, no scripts.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field


@dataclass
class TokenScore:
    """One response token: its text, its score (shading) and a tooltip."""

    text: str
    score: float
    tooltip: str = ""


@dataclass
class DocScore:
    """A training example in a query's top list; ``tokens``: its tokens with their share of
    ``score`` (shaded on the example's own scale), shown instead of ``text`` when given."""

    rank: int
    id: str
    score: float
    text: str | None
    tokens: list[TokenScore] | None = None


@dataclass
class QueryReport:
    id: str
    prompt: str
    tokens: list[TokenScore]
    top: list[DocScore]
    note: str = ""
    extra: dict = field(default_factory=dict)


def token_scores(texts: list[str], scores, positions=None) -> list[TokenScore]:
    """``TokenScore``s of a training example's tokens (e.g. ``query --train-tokens``'
    ``tokens``, ``scores`` and ``positions``), the tooltip naming each token's position."""
    pos = range(len(texts)) if positions is None else positions
    return [TokenScore(t, float(s), f"position {int(p)}: {float(s):.4g}")
            for t, s, p in zip(texts, scores, pos, strict=True)]


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
.meta { color: #555; font-size: 0.9em; }
.prompt { background: #f3f3f3; padding: 0.6em 0.8em; border-radius: 4px; white-space: pre-wrap; }
.response { padding: 0.6em 0.8em; border: 1px solid #ddd; border-radius: 4px; line-height: 2;
            white-space: pre-wrap; }
.tok { padding: 0.15em 0.05em; border-radius: 3px; }
.doc { line-height: 1.9; white-space: pre-wrap; }
table { border-collapse: collapse; width: 100%; margin-top: 0.8em; font-size: 0.92em; }
th, td { text-align: left; padding: 0.3em 0.5em; border-bottom: 1px solid #e3e3e3;
         vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.legend span { padding: 0.1em 0.4em; border-radius: 3px; }
"""


def _shade(score: float, scale: float) -> str:
    """Orange for positive influence, blue for negative, alpha by magnitude."""
    a = 0.0 if scale <= 0 else min(1.0, abs(score) / scale) * 0.85
    rgb = "255,140,0" if score >= 0 else "30,110,255"
    return f"background: rgba({rgb},{a:.3f})"


def _tokens(tokens: list[TokenScore]) -> str:
    scale = max((abs(t.score) for t in tokens), default=0.0)
    return "".join(
        f'<span class="tok" style="{_shade(t.score, scale)}" '
        f'title="{html.escape(t.tooltip or f"{t.score:.4g}")}">{html.escape(t.text)}</span>'
        for t in tokens)


def _doc_text(d: DocScore) -> str:
    if d.tokens:
        return f"<div class=doc>{_tokens(d.tokens)}</div>"
    return html.escape(d.text or "(text unavailable)")


def _docs(top: list[DocScore]) -> str:
    rows = "".join(
        f"<tr><td class=num>{d.rank}</td><td>{html.escape(d.id)}</td>"
        f"<td class=num>{d.score:.4g}</td><td>{_doc_text(d)}</td></tr>" for d in top)
    return ("<table><thead><tr><th>#</th><th>training example</th><th>score</th>"
            f"<th>text</th></tr></thead><tbody>{rows}</tbody></table>")


def render_report(queries: list[QueryReport], *, title: str = "grass_llm attribution report",
                  meta: dict[str, str] | None = None) -> str:
    """The whole report as one HTML string."""
    meta_html = "".join(f"<div>{html.escape(k)}: {html.escape(str(v))}</div>"
                        for k, v in (meta or {}).items())
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><div class=meta>{meta_html}</div>",
        "<p class=legend>Response tokens are shaded by their influence: "
        "<span style='background: rgba(255,140,0,0.6)'>raises</span> or "
        "<span style='background: rgba(30,110,255,0.6)'>lowers</span> the score of the top "
        "training example; hover a token for its own most influential examples.",
        (" Training examples' tokens are shaded by their share of that example's score (each "
         "example on its own scale)." if any(d.tokens for q in queries for d in q.top) else ""),
        "</p>",
    ]
    for q in queries:
        parts.append(f"<section><h2>{html.escape(q.id)}</h2>")
        parts.append(f"<div class=prompt>{html.escape(q.prompt)}</div>")
        parts.append(f"<div class=response>{_tokens(q.tokens)}</div>")
        if q.note:
            parts.append(f"<p class=meta>{html.escape(q.note)}</p>")
        parts.append(_docs(q.top))
        parts.append("</section>")
    parts.append("</body></html>")
    return "".join(parts)
