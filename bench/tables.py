"""Markdown tables for every table writer (bench.report, the bench/gpu measurement scripts),
rendered by tabulate (pinned in pyproject.toml) instead of by hand in each writer.

    markdown_table(["method", "MACs G"], [["dense", "0.0068"], ["shortgpt", "0.0034"]])

Cells are printed exactly as given (no number parsing: the writer owns the format, so "0.00" and
"-" stay as they are); columns are padded to their widest cell (tabulate's "github" format).
"""
from __future__ import annotations

from tabulate import tabulate


def markdown_table(headers: list[str], rows: list[list[str]], left: int | None = None) -> str:
    """A GitHub-flavoured markdown table (no trailing newline); '|' inside a cell is escaped.
    left: align the first `left` columns left and the others right (":---" / "---:" markers);
    None: tabulate's "github" format, no markers."""
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    align = None if left is None else ["left" if i < left else "right" for i in range(len(headers))]
    return tabulate([[esc(c) for c in r] for r in rows], headers=[esc(h) for h in headers],
                    tablefmt="github" if align is None else "pipe",  # pipe: the same table with alignment markers
                    disable_numparse=True, colalign=align)
