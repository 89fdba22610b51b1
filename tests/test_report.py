"""report.html: one self-contained file that shows what it is given, escaped."""

from __future__ import annotations

import re

from engramlab.report import Report, Table


def _png(path, colour: str = "red"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [1, 0], color=colour)
    fig.savefig(path)
    plt.close(fig)
    return path


def test_a_report_embeds_everything_and_escapes_what_it_shows(tmp_path):
    png = _png(tmp_path / "curve.png")
    out = Report(title="<script>alert(1)</script> run", params={"lr": 0.5, "layers": [4, 5]},
                 tables=[Table("Scores", ["metric", "before", "after"],
                               [["efficacy", 0.25, 1.0], ["fluency", None, "a<b"]])],
                 text=["line one", "x < y"], figures=[png]).write(tmp_path / "report.html")
    page = out.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page  # nothing a title can run
    assert "a&lt;b" in page and "x &lt; y" in page
    assert '<td class="num">0.25</td>' in page and "<td>–</td>" in page
    assert "[4, 5]" in page
    # the figure travels inside the file; nothing is fetched from elsewhere
    import base64

    assert base64.b64encode(png.read_bytes()).decode() in page
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert not list(tmp_path.glob(".report.html.*"))  # no temporary file left behind
