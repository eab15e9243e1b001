"""Headless Chromium helpers: render a `dvc plots show` page offline and report what actually rendered.

`check_page(html)` copies the page beside itself with two small scripts injected (a hook right after
`<body>` that wraps `vegaEmbed` and records errors; a reporter before `</body>` that, once every embed
settled, writes a JSON report into the DOM), runs Chromium `--dump-dom` on it with a virtual-time budget,
and returns that report plus the http(s) requests seen in Chromium's net log. `check_dvc_plots_page(dir)`
runs `dvc plots show` in a DVC project into a temp dir first. `problems(report)` turns a report into a
list of human-readable failures (empty = the page rendered): the pipeline test can assert on it.

Chromium: Debian's `chromium` (`make plots-deps` installs it), or $VADBENCH_CHROMIUM. It always runs with
the flags in CHROMIUM_FLAGS, a fresh --user-data-dir, host resolution mapped to nothing (so a stray
request fails at once instead of waiting on a network), and a hard timeout that kills its process group.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
INSTALL_HINT = (
    "run `make plots-deps` (installs Debian's chromium via apt-get when root, and fetches the pinned "
    "vega builds into .cache/vega/ with npm); see docs/PLOTS.md"
)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
    "--no-default-browser-check",
    "--hide-scrollbars",
    # every host name resolves to nothing: a request that should not happen fails fast, and shows in the net log
    "--host-resolver-rules=MAP * ~NOTFOUND",
)
RESULT_ID = "vadbench-check-result"


class BrowserSetupError(AssertionError):
    """Chromium or the vega cache is missing: the message says how to install them (a failure, not a skip)."""


# ---------------------------------------------------------------------------------------------- setup checks
def find_chromium() -> str:
    """Path of a Chromium binary ($VADBENCH_CHROMIUM first); BrowserSetupError with the fix if there is none."""
    env = os.environ.get("VADBENCH_CHROMIUM")
    if env:
        if shutil.which(env):
            return str(shutil.which(env))
        raise BrowserSetupError(f"$VADBENCH_CHROMIUM={env!r} is not an executable; unset it or {INSTALL_HINT}")
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserSetupError(f"no Chromium found on PATH (tried {', '.join(CHROMIUM_NAMES)}): {INSTALL_HINT}")


def load_fetch_vega() -> ModuleType:
    """scripts/fetch_vega.py as a module (scripts/ is not a package)."""
    path = REPO / "scripts" / "fetch_vega.py"
    spec = importlib.util.spec_from_file_location("vadbench_fetch_vega", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def offline_template(root: Path = REPO) -> Path:
    """The generated offline template (.cache/vega/template.html), verified; BrowserSetupError if not ready."""
    fv = load_fetch_vega()
    problems = fv.check(root)
    if problems:
        raise BrowserSetupError("vega cache not ready:\n  " + "\n  ".join(problems) + f"\n{INSTALL_HINT}")
    return root / fv.CACHE_REL / "template.html"


# ---------------------------------------------------------------------------------------------- chromium runs
def run_chromium(args: list[str], *, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run Chromium with CHROMIUM_FLAGS + `args` and a fresh profile; kill its whole process group on timeout.

    stdout/stderr go to temp files, not pipes: Chromium's helper processes could hold a pipe open after the
    main process exits, and a read on it would then hang.
    """
    exe = find_chromium()
    with tempfile.TemporaryDirectory(prefix="vadbench-chromium-") as tmp:
        tmpdir = Path(tmp)
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmpdir / 'profile'}", f"--crash-dumps-dir={tmpdir}", *args]
        out_path, err_path = tmpdir / "stdout", tmpdir / "stderr"
        env = dict(os.environ, HOME=str(tmpdir))  # keep Chromium away from the user's ~/.config, ~/.pki
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise AssertionError(
                    f"Chromium did not finish within {timeout:.0f} s: {' '.join(cmd)}\n"
                    f"stderr tail:\n{err_path.read_text(errors='replace')[-3000:]}"
                ) from None
            _kill_group(proc)  # helpers (zygote, renderer) left behind by an exited browser
        return subprocess.CompletedProcess(
            cmd,
            rc,
            out_path.read_text(encoding="utf-8", errors="replace"),
            err_path.read_text(encoding="utf-8", errors="replace"),
        )


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group we created with start_new_session, nothing else
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def dump_dom(page: Path, *, budget_ms: int = 8000, timeout: float = 60.0, net_log: Path | None = None) -> str:
    """The DOM of `page` (a local file) after scripts ran for `budget_ms` of virtual time."""
    args = [f"--virtual-time-budget={budget_ms}", "--run-all-compositor-stages-before-draw"]
    if net_log is not None:
        args.append(f"--log-net-log={net_log}")
    proc = run_chromium([*args, "--dump-dom", Path(page).resolve().as_uri()], timeout=timeout)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise AssertionError(f"chromium --dump-dom failed (exit {proc.returncode}) on {page}:\n{proc.stderr[-3000:]}")
    return proc.stdout


def screenshot(
    page: Path, png: Path, *, width: int = 1280, height: int = 2400, budget_ms: int = 8000, timeout: float = 60.0
) -> Path:
    """PNG screenshot of `page` after `budget_ms` of virtual time (for a person to look at; not asserted)."""
    png = Path(png).resolve()
    proc = run_chromium(
        [
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            Path(page).resolve().as_uri(),
        ],
        timeout=timeout,
    )
    if proc.returncode != 0 or not png.is_file():
        raise AssertionError(f"chromium --screenshot failed (exit {proc.returncode}) on {page}:\n{proc.stderr[-3000:]}")
    return png


# ---------------------------------------------------------------------------------------------- page checks
# Runs right after <body>: the vendor scripts in <head> have run, dvc's per-plot `vegaEmbed(...)` calls not yet.
_HOOK_JS = r"""
<script id="vadbench-hook">
(function () {
  var S = window.__vadbench = {errors: [], warnings: [], embeds: [], vegaEmbedDefined: typeof window.vegaEmbed === "function"};
  window.addEventListener("error", function (e) {
    var t = e.target;
    if (t && t !== window && t.tagName) { S.errors.push("failed to load <" + t.tagName.toLowerCase() + "> " + (t.currentSrc || t.src || t.href || "")); }
    else { S.errors.push("error: " + e.message + " at " + e.filename + ":" + e.lineno); }
  }, true);
  window.addEventListener("unhandledrejection", function (e) {
    var r = e.reason; S.errors.push("unhandled rejection: " + (r && (r.stack || r.message) || String(r)));
  });
  ["error", "warn"].forEach(function (level) {
    var orig = console[level];
    console[level] = function () {
      (level === "error" ? S.errors : S.warnings).push("console." + level + ": " + Array.prototype.map.call(arguments, String).join(" "));
      return orig.apply(console, arguments);
    };
  });
  if (!S.vegaEmbedDefined) { return; }
  var embed = window.vegaEmbed;
  var wrapped = function (el, spec, opts) {
    var rec = {el: String(el), status: "pending"};
    S.embeds.push(rec);
    var p;
    try { p = embed.apply(this, arguments); }
    catch (err) { rec.status = "error"; rec.error = String(err && err.stack || err); rec.done = Promise.resolve(); throw err; }
    rec.done = Promise.resolve(p).then(
      function (res) { rec.status = "ok"; rec.view = res && res.view; },
      function (err) { rec.status = "error"; rec.error = String(err && (err.stack || err.message) || err); });
    return p;
  };
  for (var k in embed) { if (Object.prototype.hasOwnProperty.call(embed, k)) { wrapped[k] = embed[k]; } }
  window.vegaEmbed = wrapped;
})();
</script>
"""

# Runs after dvc's plot divs: waits for window load and every embed, then writes the report into the DOM.
_REPORT_JS = r"""
<script id="vadbench-report">
(function () {
  var S = window.__vadbench;
  function countMarks(node, acc) {
    if (!node) { return acc; }
    if (node.marktype) {
      var n = (node.items || []).length;
      acc.marktypes[node.marktype] = (acc.marktypes[node.marktype] || 0) + n;
      // role "mark" = a mark of the chart itself (not an axis, legend, title or frame)
      if (node.role === "mark" && node.marktype !== "group") { acc.dataItems += n; }
    }
    (node.items || []).forEach(function (child) { countMarks(child, acc); });
    return acc;
  }
  function lineMarks(node, acc) {
    if (!node) { return acc; }
    if (node.marktype === "line" && node.role === "mark") { acc.push({name: node.name || null, items: (node.items || []).length}); }
    (node.items || []).forEach(function (child) { lineMarks(child, acc); });
    return acc;
  }
  // [painted, coloured]: non-white pixels, and saturated ones (data marks; axes, grid and text are grey)
  function pixels(canvas) {
    try {
      var d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data, n = 0, c = 0;
      for (var i = 0; i < d.length; i += 4) {
        if (d[i + 3] === 0) { continue; }
        var hi = Math.max(d[i], d[i + 1], d[i + 2]), lo = Math.min(d[i], d[i + 1], d[i + 2]);
        if (lo < 235) { n++; }
        if (hi - lo > 60) { c++; }
      }
      return [n, c];
    } catch (err) { return [-1, -1]; }
  }
  function external(url) { return !!url && !/^(file:|data:|blob:|about:|javascript:)/i.test(url); }
  function report() {
    var out = {vegaEmbedDefined: S.vegaEmbedDefined, errors: S.errors, warnings: S.warnings, vega: [], images: [], external: []};
    S.embeds.forEach(function (rec) {
      var el = document.querySelector(rec.el), r = {el: rec.el, status: rec.status, error: rec.error || null};
      if (rec.view) {
        var acc = countMarks(rec.view.scenegraph().root, {marktypes: {}, dataItems: 0});
        r.marktypes = acc.marktypes; r.dataItems = acc.dataItems;
        r.lines = lineMarks(rec.view.scenegraph().root, []);
      }
      // vega's own output has class "marks" (vega-embed adds an svg icon for its actions menu beside it)
      var marks = el && el.querySelector(".marks");
      r.renderer = marks ? marks.tagName.toLowerCase() : null;
      if (r.renderer === "canvas") {
        var px = pixels(marks);
        r.width = marks.width; r.height = marks.height; r.paintedPixels = px[0]; r.colouredPixels = px[1];
      } else if (r.renderer === "svg") {
        var b = marks.getBoundingClientRect(); r.width = b.width; r.height = b.height;
        r.svgPaths = marks.querySelectorAll("path").length;
      }
      r.text = el ? el.textContent.slice(0, 300) : null;
      out.vega.push(r);
    });
    Array.prototype.forEach.call(document.images, function (img) {
      out.images.push({src: img.getAttribute("src"), url: img.currentSrc || img.src, complete: img.complete,
                       naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight});
    });
    Array.prototype.forEach.call(document.querySelectorAll("[src],[href]"), function (e) {
      var u = e.src || e.href; if (external(u)) { out.external.push(e.tagName.toLowerCase() + " " + u); }
    });
    performance.getEntriesByType("resource").forEach(function (e) { if (external(e.name)) { out.external.push("resource " + e.name); } });
    var pre = document.createElement("pre");
    pre.id = "RESULT_ID";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  window.addEventListener("load", function () {
    Promise.all(S.embeds.map(function (r) { return r.done; }))
      .then(function () { return Promise.all(S.embeds.filter(function (r) { return r.view; }).map(function (r) { return r.view.runAsync(); })); })
      .catch(function (err) { S.errors.push("view.runAsync: " + err); })
      .then(function () { setTimeout(report, 100); });
  });
})();
</script>
""".replace("RESULT_ID", RESULT_ID)


def instrument(page_html: str) -> str:
    """`page_html` with the hook after <body ...> and the reporter before </body>."""
    # search after the last </head>: the inlined vendor builds in <head> contain "<body>" in strings
    head_end = max(page_html.lower().rfind("</head>"), 0)
    m = re.compile(r"<body\b[^>]*>", flags=re.IGNORECASE).search(page_html, head_end)
    end = page_html.lower().rfind("</body>")
    if m is None or end < m.end():
        raise AssertionError("page has no <body>...</body>: not a dvc plots page")
    return page_html[: m.end()] + _HOOK_JS + page_html[m.end() : end] + _REPORT_JS + page_html[end:]


def net_log_requests(net_log: Path) -> tuple[list[str], list[str]]:
    """(page, browser): URLs of the requests in a Chromium net log, split by who made them.

    file:// loads never reach the network stack, so every URL_REQUEST_START_JOB here is a network request.
    The page's own requests carry its origin as initiator ("null" for a file:// page); Chromium's
    background requests (network time, account checks) say "not an origin": with
    --host-resolver-rules they fail before DNS, so they are reported but are not the page's fault.
    """
    try:
        log = json.loads(net_log.read_text(encoding="utf-8", errors="replace"))
        start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    except (OSError, ValueError, KeyError) as exc:
        return [f"<net log {net_log.name} unreadable: {exc}>"], []
    page, browser = set(), set()
    for event in log.get("events", []):
        params = event.get("params") or {}
        if event.get("type") != start_job or "url" not in params:
            continue
        (browser if params.get("initiator") == "not an origin" else page).add(params["url"])
    return sorted(page), sorted(browser)


def check_page(page: Path, *, budget_ms: int = 8000, timeout: float = 90.0) -> dict[str, Any]:
    """Render `page` (an index.html with its static/ beside it) in headless Chromium; return the report.

    Keys: vega (one dict per vegaEmbed call: status, error, marktypes, dataItems, renderer, paintedPixels),
    vegaScripts (how many vegaEmbed scripts the page has), images (src, naturalWidth, ...), errors, warnings,
    external (non-file URLs referenced or loaded by the page), network (http(s) URLs the page asked Chromium's
    network stack for), browser_network (Chromium's own background requests, blocked; informational),
    page (the path), template_urls (http(s) URLs in the page markup outside the inlined vendor scripts and
    vega-lite "$schema" names). check_dvc_plots_page adds dvc_output (what `dvc plots show` printed).
    """
    page = Path(page).resolve()
    text = page.read_text(encoding="utf-8")
    fd, probe_name = tempfile.mkstemp(prefix=".vadbench-check-", suffix=".html", dir=page.parent)
    os.close(fd)
    probe = Path(probe_name)
    net_log = probe.with_suffix(".netlog.json")
    try:
        probe.write_text(instrument(text), encoding="utf-8")
        dom = dump_dom(probe, budget_ms=budget_ms, timeout=timeout, net_log=net_log)
        network, browser_network = net_log_requests(net_log)
    finally:
        probe.unlink(missing_ok=True)
        net_log.unlink(missing_ok=True)
    m = re.search(rf'<pre id="{RESULT_ID}">(.*?)</pre>', dom, flags=re.DOTALL)
    if m is None:
        raise AssertionError(
            f"{page}: the page did not finish rendering within {budget_ms} ms of virtual time "
            f"(no report in the dumped DOM); DOM tail:\n{dom[-2000:]}"
        )
    report = json.loads(html.unescape(m.group(1)))
    report["network"] = network
    report["browser_network"] = browser_network
    report["page"] = str(page)
    # URLs in the page's own markup (dvc's divs, the template), with the inlined vendor builds cut out:
    # vega-embed's source names its online editor and schema URLs as strings it never fetches.
    markup = re.sub(r"<script data-vendor=[^>]*>.*?</script>", "", text, flags=re.DOTALL)
    markup = re.sub(r'"\$schema"\s*:\s*"[^"]*"', "", markup)  # vega-lite specs name their schema; never fetched
    report["template_urls"] = sorted(set(re.findall(r"(?:https?|wss?)://[^\s\"'<>)]+", markup)))
    # dvc writes one `vegaEmbed('#id', spec)` script per vega plot: an embed that never ran shows up here
    report["vegaScripts"] = len(re.findall(r"vegaEmbed\(\s*['\"]#", markup))
    return report


def problems(
    report: dict[str, Any], *, expect_vega: int | None = None, expect_images: int | None = None, min_data_items: int = 2
) -> list[str]:
    """Everything wrong with a check_page report, as sentences (empty list = every chart and image rendered)."""
    out = []
    if not report.get("vegaEmbedDefined"):
        out.append("vegaEmbed is not defined: the page has no vega builds (not made from the offline template?)")
    vega, images = report.get("vega", []), report.get("images", [])
    if report.get("vegaScripts", 0) != len(vega):
        out.append(f"{report.get('vegaScripts')} vegaEmbed scripts in the page but {len(vega)} embeds ran")
    if expect_vega is not None and len(vega) != expect_vega:
        out.append(f"expected {expect_vega} vega charts, the page embedded {len(vega)}")
    for r in vega:
        where = r["el"]
        if r["status"] != "ok":
            out.append(f"{where}: vegaEmbed {r['status']}: {r.get('error')}")
            continue
        if (r.get("dataItems") or 0) < min_data_items:
            out.append(f"{where}: only {r.get('dataItems')} data mark items drawn (marks {r.get('marktypes')})")
        if r.get("renderer") is None:
            out.append(f"{where}: no <canvas> or <svg> in the chart's div")
        elif r["renderer"] == "canvas" and (r.get("colouredPixels") or 0) <= 0:
            out.append(f"{where}: no coloured (data) pixels on the canvas ({r.get('paintedPixels')} painted)")
        elif r["renderer"] == "svg" and (r.get("svgPaths") or 0) == 0:
            out.append(f"{where}: the svg has no paths")
        if "error" in (r.get("text") or "").lower():
            out.append(f"{where}: the chart shows an error: {r['text']!r}")
    if expect_images is not None and len(images) != expect_images:
        out.append(f"expected {expect_images} images, the page has {len(images)}")
    for img in images:
        if not img["complete"] or img["naturalWidth"] <= 0 or img["naturalHeight"] <= 0:
            out.append(f"image {img['src']} did not load ({img['naturalWidth']}x{img['naturalHeight']}, {img['url']})")
    for e in report.get("errors", []):
        out.append(f"page error: {e}")
    for u in report.get("external", []):
        out.append(f"page referenced or loaded a non-file URL: {u}")
    for u in report.get("network", []):
        out.append(f"Chromium's network stack was asked for {u}")
    for u in report.get("template_urls", []):
        out.append(f"page markup contains the URL {u}")
    dvc_output = report.get("dvc_output") or ""
    if re.search(r"(?i:failed to load)|^ERROR\b", dvc_output, flags=re.MULTILINE):
        out.append(f"dvc plots show reported: {dvc_output[-1000:]}")
    return out


def dvc_plots_show(
    project_dir: Path,
    out_dir: Path,
    *,
    html_template: Path | None = None,
    targets: list[str] | None = None,
    timeout: float = 300.0,
) -> tuple[Path, str]:
    """Run `dvc plots show -o out_dir` in `project_dir` (the venv's dvc); return (out_dir/index.html, its output).

    dvc still writes a page (exit 0) when some declared plot files are missing; it then says
    "DVC failed to load some plots" in the output, which `problems` reports.
    """
    cmd = [sys.executable, "-m", "dvc", "plots", "show", "-o", str(Path(out_dir).resolve())]
    if html_template is not None:
        cmd += ["--html-template", str(Path(html_template).resolve())]
    cmd += list(targets or [])
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    try:
        proc = subprocess.run(
            cmd, cwd=project_dir, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"`{' '.join(cmd)}` took more than {timeout:.0f} s in {project_dir}") from None
    page = Path(out_dir) / "index.html"
    if proc.returncode != 0 or not page.is_file():
        raise AssertionError(
            f"`{' '.join(cmd)}` failed in {project_dir} (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return page, (proc.stdout + proc.stderr).strip()


def check_dvc_plots_page(
    project_dir: Path,
    *,
    out_dir: Path | None = None,
    html_template: Path | None = None,
    targets: list[str] | None = None,
    screenshot_png: Path | None = None,
) -> dict[str, Any]:
    """`dvc plots show` in `project_dir`, then render the page in headless Chromium; return check_page's report.

    The page goes to `out_dir` (default: a fresh temp dir, removed afterwards; the project's own dvc_plots/
    is not touched). `html_template` defaults to the project's `plots.html_template` config (pass one to
    override); in a copy of this repo without its own .cache/vega/, this checkout's generated template. With `screenshot_png`, also saves a screenshot of the uninstrumented page. Assert with
    `problems(report, expect_vega=..., expect_images=...) == []`. Needs Chromium and, for the default
    template of this repo, `make plots-deps`: raises BrowserSetupError with that hint otherwise.
    """
    project_dir = Path(project_dir).resolve()
    find_chromium()  # fail with the install hint before spending time on dvc
    if html_template is None and (project_dir / "scripts" / "fetch_vega.py").is_file():
        # a vadbench checkout: its .dvc/config names .cache/vega/template.html. A temp copy of the repo (the
        # pipeline test) has no generated template of its own: give dvc this checkout's, verified.
        if load_fetch_vega().check(project_dir):
            html_template = offline_template(REPO)
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vadbench-plots-")
        out_dir = Path(tmp.name) / "dvc_plots"
    try:
        page, dvc_output = dvc_plots_show(project_dir, Path(out_dir), html_template=html_template, targets=targets)
        report = check_page(page)
        report["dvc_output"] = dvc_output
        if screenshot_png is not None:
            report["screenshot"] = str(screenshot(page, Path(screenshot_png)))
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()
