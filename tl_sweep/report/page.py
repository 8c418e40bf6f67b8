"""The report as one self-contained HTML page: ``report.md`` rendered (CommonMark with tables, by markdown-it-py), each
plot it shows inlined as a data URI, so the page needs nothing beside it: it opens alone in a browser, and in
MLflow's artifact view (``report/report.html`` on the parent run), where a researcher reads the study without
leaving the UI."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #1f2328; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fafbfc; }
code { background: #f6f8fa; padding: 0 3px; border-radius: 3px; }
img { max-width: 100%; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
"""


def render(markdown: str, folder: Path, title: str) -> str:
    """The page for ``markdown`` whose images are files in ``folder`` (a missing one stays a plain link)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)

    def inline(m: re.Match) -> str:
        name = html.unescape(m.group(1))
        f = folder / name
        if "/" in name or not f.is_file():
            return m.group(0)
        return f'<img src="data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}"'

    body = re.sub(r'<img src="([^"]+\.png)"', inline, body)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{body}</body></html>\n")


def write(markdown: str, folder: Path, title: str) -> Path:
    """``report.html`` beside ``report.md`` in ``folder``."""
    out = folder / "report.html"
    out.write_text(render(markdown, folder, title))
    return out
