"""PatchCore under a memory budget: quality of the chunked coreset, peak RSS against the budget, seconds per image.

    .venv/bin/python benchmarks/bench_patchcore_budget.py            # ~10 min → benchmarks/results/patchcore_budget.md
    .venv/bin/python benchmarks/bench_patchcore_budget.py --quick    # small sizes, prints only
    .venv/bin/python benchmarks/bench_patchcore_budget.py --parts memory --memory 20000:2:16384 --out r.md
                                                     # other runs: N:memory_budget_gb[:coreset_chunk_patches]

1. Quality (`quality`, in process): the default synthetic_sem dataset (128 px, 100 train images) and the toy line
   images of the tests, random-init resnet18, PatchCore's params.yaml settings; the single greedy pass
   (the paper; what the default budget does here) against the chunked path forced by a tiny budget and
   `coreset_chunk_patches` (k-center per chunk, bank = union of the chunks' picks), and a float16 bank.
   Image and pixel AUROC, bank rows, fit seconds, largest score difference to the single pass.
2. Accounting (`accounting`): the bank machinery alone on random rows, measured peak vs `plan_bank`'s bytes.
3. Memory and time (`memory`, one child process per run): a folder of random-texture 256×256 grey PNGs (a prepared
   dataset's manifest, read by `ImageSource` as the fit stage does), resnet18 layer2+3, coreset 1 %, the
   given budget. Recorded: whole-process peak RSS (VmHWM: imports and backbone included), the peak
   over the RSS just before `fit` (what the budget bounds, plus one batch of activations), the bank
   plan, fit seconds per training image; a sampler thread reads VmRSS every 0.5 s during fit.
Timings on this shared 2-core machine are noisy (see shared/notes/environment.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, threading, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[5]))
from torch.utils.data import Subset
from vadbench.backbones import load_feature_extractor
from vadbench.data.source import ImageSource
from vadbench.models import create_model

def rss(field="VmRSS"):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) * 1024

data, bb, n, params = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
fe = load_feature_extractor(bb, params["layers"])
model = create_model("patchcore", backbone=fe, seed=0, **params)
train = Subset(ImageSource(data, "train"), range(n))
from vadbench.models.components.patch_features import to_rows
from vadbench.models.components.coreset import subsample_indices
with torch.no_grad():  # warm-up: one batch, one small selection (code pages, thread pools: once per process)
    to_rows(model._embed(torch.rand(params["batch_size"], 1, 256, 256)))
    subsample_indices(torch.randn(4096, 384), "greedy_coreset", 0.01, torch.Generator().manual_seed(0))
before = rss()
samples, done = [], threading.Event()
def sample():
    while not done.wait(0.5):
        samples.append(rss())
th = threading.Thread(target=sample, daemon=True)
th.start()
t = time.perf_counter()
if sys.argv[6] == "embed":  # the stream and the embedding only: the constant that the budget does not cover
    from vadbench.data.source import float_batches
    with torch.no_grad():
        for x in float_batches(train, params["batch_size"], "cpu"):
            to_rows(model._embed(x))
    report = {"patches": n * 1024, "embed_dim": 384, "bank_strategy": "embedding only", "chunks": 0,
              "chunk_patches": 0, "memory_bank_size": 0, "planned_bank_bytes": 0}
else:
    report = model.fit(train)
seconds = time.perf_counter() - t
done.set(); th.join()
q = max(1, len(samples) // 4)
print(json.dumps({"n": n, "fit_seconds": seconds, "rss_before": before, "peak_rss": rss("VmHWM"),
                  "rss_first_quarter": statistics.median(samples[:q]) if samples else before,
                  "rss_last_quarter": statistics.median(samples[-q:]) if samples else before,
                  "bank_bytes": model.memory_bank.numel() * model.memory_bank.element_size(), "report": report}))
""".replace("import json, sys", "import json, statistics, sys")

# the bank machinery alone on random rows (no backbone): measured peak over the baseline vs `plan_bank`'s count
ACCOUNTING = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
from vadbench.models.components.coreset import ChunkedCoreset, plan_bank, subsample_indices

def rss(field="VmRSS"):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) * 1024

rows, dim, ratio, budget = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
gen_rows = torch.Generator().manual_seed(1)
batch = torch.empty(16384, dim)
batch.normal_(generator=gen_rows)
plan = plan_bank(rows, dim, method="greedy_coreset", ratio=ratio, budget_bytes=int(budget * (1 << 30)))
# warm-up on a few rows: BLAS code pages and thread pools are loaded once per process, not per bank
subsample_indices(torch.randn(4096, dim), "greedy_coreset", 0.01, torch.Generator().manual_seed(0))
before = rss()
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here on
t = time.perf_counter()
gen = torch.Generator().manual_seed(0)
if plan.strategy == "single_pass":
    bank = torch.empty(rows, dim)
    for start in range(0, rows, 16384):
        bank[start : start + 16384] = batch[: min(16384, rows - start)].normal_(generator=gen_rows)
    out = bank[subsample_indices(bank, "greedy_coreset", ratio, gen)].contiguous()
    del bank
else:
    cc = ChunkedCoreset(plan, "greedy_coreset", ratio, gen)
    for start in range(0, rows, 16384):
        cc.add(batch[: min(16384, rows - start)].normal_(generator=gen_rows))
    out = cc.finish()
print(json.dumps({"reductions": 0 if plan.strategy == "single_pass" else cc.reductions, "rows": rows, "dim": dim, "ratio": ratio, "budget": budget, "strategy": plan.strategy, "chunks": plan.chunks,
                  "chunk": plan.chunk_rows, "bank_rows": out.shape[0], "planned": plan.planned_bytes,
                  "peak_delta": rss("VmHWM") - before, "seconds": time.perf_counter() - t}))
"""

GIB = 1 << 30


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def make_textures(root: Path, n: int, size: int = 256, seed: int = 0) -> None:
    """`n` random-texture grey PNGs (smoothed noise at a random scale + a random grating) as a prepared train split."""
    import numpy as np
    from PIL import Image

    from vadbench.data.manifest import ManifestRow, write_manifest

    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    rows = []
    for i in range(n):
        k = int(rng.integers(2, 9))
        noise = rng.normal(size=(size + k, size + k)).astype(np.float32).cumsum(0).cumsum(1)
        noise = (noise[k:, k:] - noise[:-k, k:] - noise[k:, :-k] + noise[:-k, :-k])[:size, :size] / k
        theta, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.3)
        grating = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy))
        img = 128 + 25 * noise + 40 * grating
        path = f"train/{i:06d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / path, compress_level=1)
        rows.append(ManifestRow(path, "train", 0, "good"))
    write_manifest(root, rows, compute_hashes=False)


def memory_runs(specs: list[tuple[int, float, int | None]], threads: int, tmp: Path, bdir: Path) -> list[dict]:
    data = tmp / "textures"
    t0 = time.perf_counter()
    make_textures(data, max(n for n, _, _ in specs))
    print(f"generated {max(n for n, _, _ in specs)} textures in {time.perf_counter() - t0:.0f} s", flush=True)
    out = []
    for n, budget, cap in [(min(200, specs[0][0]), 0.0, None), *specs]:  # first: the embedding-only floor
        params = {
            "layers": ["layer2", "layer3"],
            "coreset_ratio": 0.01,
            "memory_budget_gb": budget or 2.0,
            "coreset_chunk_patches": cap,
            "batch_size": 16,
        }
        mode = "embed" if budget == 0.0 else "fit"
        res = subprocess.run(
            [sys.executable, "-c", CHILD, str(data), str(bdir), str(n), json.dumps(params), str(threads), mode],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=_env(),
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"child failed ({n}, {budget}): {res.stderr[-2000:]}")
        row = json.loads(res.stdout.strip().splitlines()[-1]) | {
            "budget_gb": budget if mode == "fit" else "—",
            "cap": cap,
        }
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def accounting_runs(specs: list[tuple[int, int, float, float]], threads: int) -> list[dict]:
    out = []
    for rows, dim, ratio, budget in specs:
        res = subprocess.run(
            [sys.executable, "-c", ACCOUNTING, str(rows), str(dim), str(ratio), str(budget), str(threads)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=_env(),
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"accounting child failed: {res.stderr[-2000:]}")
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(out[-1]), flush=True)
    return out


def quality_runs(tmp: Path, bdir: Path, quick: bool, threads: int) -> list[dict]:
    """Single pass vs chunked vs float16 on synthetic_sem (default params) and the tests' toy images."""
    import numpy as np
    import torch
    import yaml
    from sklearn.metrics import roc_auc_score

    from vadbench.backbones import load_feature_extractor
    from vadbench.config import load_params
    from vadbench.data.prepare import prepare_dataset
    from vadbench.data.source import ImageSource
    from vadbench.models import create_model

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_toy_defect_data

    sem = tmp / "synthetic_sem"
    params = load_params(ROOT / "params.yaml")
    prepare_dataset(
        "synthetic_sem", params.datasets["synthetic_sem"], out_dir=sem, seed=0, preview_png=None, progress=False
    )
    test = ImageSource(sem, "test")
    sets = {
        "synthetic_sem": (
            ImageSource(sem, "train"),
            torch.stack([test[i] for i in range(len(test))]).float().div(255),
            test.labels,
            np.stack([test.mask(i).numpy() for i in range(len(test))]),
        ),
        "toy lines (tests)": make_toy_defect_data(),
    }
    base = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]["patchcore"]
    # chunk sizes in images (synthetic_sem: 1,024 patches per image; toy: 256): 25, 4 and 1 image(s) per chunk
    chunk_images = (25, 4, 1) if not quick else (4,)
    rows = []
    for set_name, (train, images, labels, masks) in sets.items():
        ref = single = None
        variants = [("single pass (default budget)", {})]
        variants += [(f"chunked, {c} image(s) per chunk", {"chunk_images": c}) for c in chunk_images]
        variants += [("float16 bank, single pass", {"bank_dtype": "float16"})]
        for label, extra in variants:
            hp = {**base, **extra}
            if "chunk_images" in hp:  # forced: half the bytes the single pass planned, chunks of c images
                c = hp.pop("chunk_images")
                hp |= {
                    "memory_budget_gb": single["planned_bank_bytes"] / 2 / GIB,
                    "coreset_chunk_patches": c * single["patches_per_image"],
                }
            fe = load_feature_extractor(bdir, hp["layers"])
            model = create_model("patchcore", backbone=fe, seed=0, **hp)
            t = time.perf_counter()
            report = model.fit(train)
            fit_s = time.perf_counter() - t
            parts = [model.predict(images[i : i + 16]) for i in range(0, len(images), 16)]
            scores = torch.cat([p[0] for p in parts]).numpy()
            maps = torch.cat([p[1] for p in parts]).numpy()
            if ref is None:
                ref, single = scores, report
            rows.append(
                {
                    "data": set_name,
                    "variant": label,
                    "image_auroc": roc_auc_score(labels, scores),
                    "pixel_auroc": roc_auc_score(np.asarray(masks).ravel(), maps.ravel()),
                    "bank": report["memory_bank_size"],
                    "patches": report["patches"],
                    "chunks": report["chunks"],
                    "chunk": report["chunk_patches"],
                    "fit_s": fit_s,
                    "budget_gb": hp.get("memory_budget_gb", 2.0),
                    "max_score_diff": float(np.abs(scores - ref).max() / np.abs(ref).max()),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes, no results file")
    ap.add_argument(
        "--memory",
        nargs="*",
        default=None,
        metavar="N:BUDGET[:CAP]",
        help="memory runs: train images, memory_budget_gb, optional coreset_chunk_patches",
    )
    ap.add_argument(
        "--parts",
        nargs="+",
        choices=("quality", "accounting", "memory"),
        default=["quality", "accounting", "memory"],
        help="which sections to run",
    )
    ap.add_argument(
        "--accounting",
        nargs="*",
        default=None,
        metavar="ROWS:DIM:RATIO:BUDGET",
        help="accounting runs: random rows × dims, coreset ratio, memory budget in GiB",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--append", action="store_true", help="append the sections to --out instead of replacing it")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "patchcore_budget.md")
    a = ap.parse_args()
    if a.accounting is None:
        a.accounting = (
            ["100000:384:0.01:0.05", "100000:384:0.01:0.5"]
            if a.quick
            else ["200000:384:0.01:0.5", "500000:384:0.01:0.1", "500000:384:0.1:0.1", "500000:384:0.1:0.05"]
        )
    if a.memory is None:
        a.memory = ["200:0.05", "400:0.05"] if a.quick else ["1000:0.1", "2000:0.1"]
    specs = []
    for s in a.memory:
        parts = s.split(":")
        specs.append((int(parts[0]), float(parts[1]), int(parts[2]) if len(parts) > 2 else None))

    from vadbench.backbones import materialize_backbone

    started = time.time()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        bdir = tmp / "random"
        materialize_backbone(bdir, arch="resnet18", init="random", seed=0)
        quality = quality_runs(tmp, bdir, a.quick, a.threads) if "quality" in a.parts else []
        acc_specs = [(int(r), int(d), float(q), float(b)) for r, d, q, b in (x.split(":") for x in a.accounting)]
        accounting = accounting_runs(acc_specs, a.threads) if "accounting" in a.parts else []
        memory = memory_runs(specs, a.threads, tmp, bdir) if specs and "memory" in a.parts else []

    lines = [
        "## Appended run" if a.append else "# PatchCore under a memory budget",
        "",
        f"Generated by `benchmarks/bench_patchcore_budget.py {' '.join(sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} ({time.time() - started:.0f} s); "
        f"{os.cpu_count()}-core CPU, {a.threads} torch threads, load average {load0:.1f} at start and "
        f"{os.getloadavg()[0]:.1f} at the end (a shared machine: timings are noisy). Random-init resnet18 (seed 0).",
        "",
    ]
    if quality:
        lines += [
            "## Chunked coreset vs the single greedy pass",
            "",
            "PatchCore with the params.yaml settings (layer1+2, coreset 5 %; synthetic_sem: 128 px, 100 train / 86 test "
            "images, 1,024 patches each; toy: 64 px, 24 train / 16 test, 256 patches each). Chunked: "
            "`memory_budget_gb` set to half of what the single pass needs and `coreset_chunk_patches` = 25, 4 or 1 "
            "image(s) of patches, so each chunk is coreset on its own and the bank is the union. "
            "Score diff = max |score − single-pass score| / max single-pass score.",
            "",
            "| data | variant | image AUROC | pixel AUROC | bank rows / patches | chunks × rows | fit s | score diff |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['data']} | {r['variant']} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['bank']:,} / {r['patches']:,} "
            f"| {r['chunks']} × {r['chunk']:,} | {r['fit_s']:.1f} | {r['max_score_diff']:.2e} |"
            for r in quality
        ]
    if accounting:
        lines += [
            "",
            "## The bank machinery alone: measured peak vs the planned bytes",
            "",
            "Random float32 rows fed 16,384 at a time (no backbone), greedy coreset; Δ peak = VmHWM over the RSS "
            "before the bank work (reset through /proc/self/clear_refs), planned = `plan_bank`'s count, "
            "which `memory_budget_gb` bounds.",
            "",
            "| rows × dims | ratio | budget (GiB) | plan | chunks × rows | union reductions | bank rows | planned (MiB) "
            "| Δ peak (MiB) | s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['rows']:,} × {r['dim']} | {r['ratio'] if 'ratio' in r else ''} | {r['budget']:g} | {r['strategy']} "
            f"| {r['chunks']} × {r['chunk']:,} | {r['reductions']} | {r['bank_rows']:,} | {r['planned'] / 2**20:.0f} "
            f"| {r['peak_delta'] / 2**20:.0f} | {r['seconds']:.0f} |"
            for r in accounting
        ]
    if memory:
        lines += [
            "",
            "## Peak memory and time against the budget",
            "",
            "256×256 grey random textures (PNG folder through `ImageSource`), resnet18 layer2+3 (1,024 patches × 384 "
            "dims per image), coreset 1 %, batch 16. Peak RSS = VmHWM of the child (imports, backbone, everything); "
            "Δ = peak − RSS just before `fit` (after a warm-up batch): the bank's share, which the budget bounds, plus "
            "one batch of images, activations and patch rows — the first row streams and embeds without any bank, "
            "which measures that constant. RSS 1st → last quarter: medians of VmRSS sampled during fit.",
            "",
            "| train images | all patches fp32 (GiB) | budget (GiB) | plan | chunks × rows | bank rows | planned (GiB) "
            "| peak RSS (GiB) | Δ peak (GiB) | RSS 1st → last quarter (GiB) | fit s | s / image |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in memory:
            rep = r["report"]
            cap = "" if r["cap"] is None else f" (chunks ≤ {r['cap']:,})"
            lines.append(
                f"| {r['n']:,} | {rep['patches'] * rep['embed_dim'] * 4 / GIB:.2f} | {r['budget_gb']}{cap} | {rep['bank_strategy']} "
                f"| {rep['chunks']} × {rep['chunk_patches']:,} | {rep['memory_bank_size']:,} | {rep['planned_bank_bytes'] / GIB:.3f} "
                f"| {r['peak_rss'] / GIB:.2f} | {(r['peak_rss'] - r['rss_before']) / GIB:.3f} "
                f"| {r['rss_first_quarter'] / GIB:.2f} → {r['rss_last_quarter'] / GIB:.2f} | {r['fit_seconds']:.0f} "
                f"| {r['fit_seconds'] / r['n']:.3f} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.quick:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        if a.append and a.out.is_file():  # one level down: the appended run's sections nest under its heading
            text = a.out.read_text() + "\n" + text.replace("\n## ", "\n### ")
        a.out.write_text(text)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
