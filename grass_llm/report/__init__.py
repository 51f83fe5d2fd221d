"""Self-contained HTML reports of attribution results."""

from grass_llm.report.html import (
    DocScore,
    QueryReport,
    TokenScore,
    render_report,
    token_scores,
)

__all__ = ["DocScore", "QueryReport", "TokenScore", "render_report", "token_scores"]
