"""reports/index.html: self-contained (no network, every figure inlined), and it renders in headless Chromium."""

from __future__ import annotations

import json
import re

import browser
import numpy as np
from test_report import cells  # noqa: F401  (fixture: four cells' score outputs in tmp_path)

from vadbench.report.aggregate import aggregate
from vadbench.report.gallery import render_gallery

_PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({alt: i.alt, w: i.naturalWidth, complete: i.complete}));
  const tables = [...document.querySelectorAll('table')].map(t => t.rows.length);
  const out = document.createElement('pre');
  out.id = 'vadbench-page-check';
  out.textContent = JSON.stringify({imgs, tables, text: document.body.innerText.length});
  document.body.appendChild(out);
});
</script>"""


def _page(tmp_path, cells):  # noqa: F811
    reports = tmp_path / "reports"
    rng = np.random.default_rng(0)
    scores, labels = rng.random(6), np.array([0, 0, 0, 1, 1, 1])
    for cell in cells[:2]:  # two cells have a gallery, two do not: the page says so instead of breaking
        masks = np.zeros((6, 32, 32), np.uint8)
        masks[3:, 8:16, 8:16] = 1
        out = reports / "cells" / cell.name / "gallery.png"
        out.parent.mkdir(parents=True)
        render_gallery(rng.random((6, 1, 32, 32)), masks, rng.random((6, 32, 32)), scores, labels, out, per_group=1)
    page = tmp_path / "index.html"
    aggregate(
        cells,
        scores_dir=tmp_path / "scores",
        metrics_dir=tmp_path / "metrics",
        reports_dir=reports,
        measured_dir=tmp_path / "measured",
        report_page=page,
    )
    return page


def test_page_holds_every_section_and_needs_nothing_from_outside(tmp_path, cells):  # noqa: F811
    text = _page(tmp_path, cells).read_text()
    for needle in ("Leaderboard: sem", "fractal − random", "Costs", "image-level method", "Anomaly-map galleries"):
        assert needle in text
    assert "sem-patchcore-fractal" in text and "sem-panda-random: not generated" in text
    assert "<td>1.5</td>" in text  # the measured fit seconds of the fixture
    # nothing loads from anywhere: no external src/href, no script, figures are data URIs
    assert not re.search(r"""(src|href)=["'](https?:)?//""", text)
    assert "<script" not in text and "<link" not in text
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert len(srcs) == 4 and all(s.startswith("data:image/") for s in srcs)  # 2 overview figures + 2 galleries


def test_page_renders_in_headless_chromium(tmp_path, cells):  # noqa: F811
    page = _page(tmp_path, cells)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    net_log = tmp_path / "net.json"
    dom = browser.dump_dom(probe, budget_ms=5000, net_log=net_log)
    found = re.search(r'<pre id="vadbench-page-check">(.*?)</pre>', dom, re.S)
    assert found, "the page did not finish loading"
    report = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(report["imgs"]) == 4 and all(i["complete"] and i["w"] > 0 for i in report["imgs"]), report["imgs"]
    assert len(report["tables"]) >= 4 and min(report["tables"]) >= 2  # header + at least one row each
    page_requests, _ = browser.net_log_requests(net_log)
    assert page_requests == []
