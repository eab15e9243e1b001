"""`dvc plots show` builds one offline page (vega curves + PNGs) that renders in headless Chromium.

Needs Debian's `chromium` and the pinned vega builds in .cache/vega/: `make plots-deps` installs both.
Without them these tests FAIL with that hint (browser.BrowserSetupError), they never skip.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import browser
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
N_POINTS = 21  # rows in each toy curve CSV; every row must become a point of the drawn line

DVC_YAML = """\
stages:
  score:
    cmd: python make_plots.py
    plots:
      - reports/cells/toy-padim-r18/roc.csv:
          cache: false
          x: fpr
          y: tpr
      - reports/cells/toy-padim-r18/pr.csv:
          cache: false
          x: recall
          y: precision
      - reports/cells/toy-padim-r18/gallery.png:
          cache: false
  aggregate:
    cmd: python make_plots.py
    plots:
      - reports/leaderboard.png:
          cache: false
"""


def _run(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, f"{cmd} failed in {cwd}:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def toy_project(tmp_path_factory) -> Path:
    """A DVC project shaped like ours: one cell's ROC/PR CSVs and gallery PNG, plus an overview PNG.

    Its .dvc/config names the offline template the way ours does, so a plain `dvc plots show` uses it.
    """
    browser.find_chromium()  # both users of this project need Chromium: fail early with the hint
    template = browser.offline_template(REPO)
    root = tmp_path_factory.mktemp("plots") / "proj"
    root.mkdir()
    _run(["git", "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    with open(root / ".dvc" / "config", "a", encoding="utf-8") as fh:
        fh.write(f"[plots]\n    html_template = {template}\n")
    (root / "dvc.yaml").write_text(DVC_YAML)
    cell = root / "reports" / "cells" / "toy-padim-r18"
    cell.mkdir(parents=True)
    t = np.linspace(0.0, 1.0, N_POINTS)
    (cell / "roc.csv").write_text("fpr,tpr\n" + "".join(f"{a:.4f},{b:.4f}\n" for a, b in zip(t, np.sqrt(t))))
    (cell / "pr.csv").write_text(
        "recall,precision\n" + "".join(f"{a:.4f},{b:.4f}\n" for a, b in zip(t, 1 - 0.5 * t**2))
    )
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 96, 3)) * 255).astype(np.uint8)).save(cell / "gallery.png")
    Image.fromarray((rng.random((40, 64)) * 255).astype(np.uint8)).save(root / "reports" / "leaderboard.png")
    return root


def test_repo_config_points_plain_dvc_plots_show_at_the_offline_template():
    """`.dvc/config` plots.html_template (relative to .dvc/, as DVC reads it) is the generated template, and that
    template inlines exactly the vega versions dvc-render would load from its CDN, with no {scripts} slot."""
    from dvc_render.vega import VegaRenderer

    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".dvc" / "config")
    assert cfg.has_option("plots", "html_template"), ".dvc/config has no [plots] html_template"
    configured = (REPO / ".dvc" / cfg.get("plots", "html_template")).resolve()
    template = browser.offline_template(REPO)  # fails with the `make plots-deps` hint when not generated
    assert configured == template.resolve()

    cdn = dict(re.findall(r"cdn\.jsdelivr\.net/npm/([a-z-]+)@([0-9.]+)", VegaRenderer.SCRIPTS))
    text = template.read_text(encoding="utf-8")
    inlined = dict(re.findall(r'<script data-vendor="([a-z-]+)@([0-9.]+)">', text))
    assert cdn == inlined == {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}, (cdn, inlined)
    assert "{scripts}" not in text and text.count("{plot_divs}") == 1
    assert "<script src=" not in text


def test_dvc_plots_show_page_renders_curves_and_images_offline(toy_project, tmp_path):
    # plain `dvc plots show`: the template comes from the project's config, as in our repo
    report = browser.check_dvc_plots_page(toy_project, out_dir=tmp_path / "out")

    assert browser.problems(report, expect_vega=2, expect_images=2) == [], report
    charts = {r["el"]: r for r in report["vega"]}
    assert set(charts) == {"#reports_cells_toy-padim-r18_roc_csv", "#reports_cells_toy-padim-r18_pr_csv"}, charts
    for chart in charts.values():
        # dvc's linear template draws the raw line (plus a smoothed one): one point per CSV row
        assert N_POINTS in [line["items"] for line in chart["lines"]], chart
        assert chart["renderer"] == "canvas" and chart["colouredPixels"] > 200, chart
    loaded = {Path(img["src"]).name: (img["naturalWidth"], img["naturalHeight"]) for img in report["images"]}
    assert loaded == {
        "workspace_reports_cells_toy-padim-r18_gallery.png": (96, 48),
        "workspace_reports_leaderboard.png": (64, 40),
    }, loaded
    assert report["network"] == [] and report["external"] == [] and report["template_urls"] == []


def test_checker_catches_the_default_cdn_page_and_a_missing_image(toy_project, tmp_path):
    """Negative control: dvc's own page (CDN scripts) offline, with one PNG deleted, must be reported."""
    from dvc_render.html import PAGE_HTML

    default_page = tmp_path / "dvc_default_page.html"
    default_page.write_text(PAGE_HTML, encoding="utf-8")  # what dvc uses when no template is configured
    page, _ = browser.dvc_plots_show(toy_project, tmp_path / "out", html_template=default_page)
    gallery = tmp_path / "out" / "static" / "workspace_reports_cells_toy-padim-r18_gallery.png"
    gallery.unlink()

    report = browser.check_page(page)
    found = "\n".join(browser.problems(report, expect_vega=2, expect_images=2))

    assert "vegaEmbed is not defined" in found
    assert any(u.startswith("https://cdn.jsdelivr.net/npm/vega@5.20.2") for u in report["network"]), report["network"]
    assert "https://cdn.jsdelivr.net/npm/vega-embed@6.18.2" in report["template_urls"]
    assert "image static/workspace_reports_cells_toy-padim-r18_gallery.png did not load" in found
    assert "image static/workspace_reports_leaderboard.png" not in found  # the other image still loads


@pytest.mark.parametrize("bad", ["</script>", "{plot_divs}"])
def test_fetch_vega_refuses_builds_that_cannot_be_inlined(bad):
    fv = browser.load_fetch_vega()
    with pytest.raises(fv.VegaFetchError, match="vega-lite"):
        fv._check_js("vega-lite", f"var a = '{bad}';".encode())


def test_missing_setup_fails_with_the_install_hint(tmp_path, monkeypatch):
    """No vega cache / no Chromium is a failure that says `make plots-deps`, never a skip."""
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "template.html").write_text("{plot_divs}")
    with pytest.raises(browser.BrowserSetupError, match="make plots-deps"):
        browser.offline_template(tmp_path)
    monkeypatch.setenv("VADBENCH_CHROMIUM", str(tmp_path / "no-such-chromium"))
    with pytest.raises(browser.BrowserSetupError, match="make plots-deps"):
        browser.find_chromium()
