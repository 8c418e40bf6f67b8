"""report.html: the report as one page that needs nothing beside it (tables rendered, plots inlined)."""

from __future__ import annotations

import base64

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tl_sweep.report import page  # noqa: E402


def test_the_page_renders_the_tables_and_carries_its_plots_inline(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "freeze_depth.png")
    plt.close(fig)
    md = ("# tl-sweep report: x\n\n| source | NTG pts [95% CI] |\n|---|---|\n| source:a | -2.3 [-7.9, +3.4] |\n\n"
          "![freeze depth](freeze_depth.png)\n\n![gone](missing.png)\n\n<script>alert(1)</script>\n")
    out = page.write(md, tmp_path, "tl-sweep report: x")
    text = out.read_text()
    assert out.name == "report.html" and text.startswith("<!doctype html>")
    assert "<table>" in text and "<td>-2.3 [-7.9, +3.4]</td>" in text
    png = base64.b64encode((tmp_path / "freeze_depth.png").read_bytes()).decode()
    assert f'src="data:image/png;base64,{png}"' in text  # the plot travels inside the page
    assert 'src="missing.png"' in text  # a file that is not there stays a link
    assert "<script>" not in text  # raw HTML in the markdown is text, not markup
