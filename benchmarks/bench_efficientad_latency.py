"""EfficientAD-S / -M inference latency per image at 256 px on this CPU, and its GPU when it has one (batch 1).

    .venv/bin/python benchmarks/bench_efficientad_latency.py            # → benchmarks/results/efficientad_latency.md
    .venv/bin/python benchmarks/bench_efficientad_latency.py --quick    # fewer repeats, prints only

Times `model.predict` (teacher + student + autoencoder, quantile-normalised, padded and upsampled map) on
one 3×256×256 image after warm-up, as the paper's latency table (which uses a GPU, fp16, batch 1). The
weights are random (latency does not depend on them) and the backbone is only a normaliser at inference,
so no trained model or dataset is needed. The sizes are measured in alternation, `--rounds` rounds, each
reporting the median of `--repeats` calls; the table gives the median and range over rounds. This shared
2-core machine sometimes runs ~3.7× slower for tens of seconds: the range shows that.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(name: str, size: int):
    from vadbench.backbones import FeatureExtractor, build_feature_net
    from vadbench.models import create_model

    net = build_feature_net("resnet18", ["layer2", "layer3"])
    backbone = FeatureExtractor(net, ["layer2", "layer3"], [0.2] * 3, [0.5] * 3, arch="resnet18")
    model = create_model(name, backbone=backbone, teacher="random", image_size=size, seed=0).eval()
    model.quantiles = torch.tensor([0.0, 1.0, 0.0, 1.0])
    return model


def median_ms(model, image: torch.Tensor, warmup: int, repeats: int) -> float:
    """Batch-1 latency of `model.predict` as the score stage measures it (`cost.measure_latency`): predict returns
    CPU tensors, so a CUDA call is finished when it returns."""
    from vadbench.metrics.cost import measure_latency

    return measure_latency(model.predict, image, warmup=warmup, repeats=repeats, batch_size=1)["latency_ms_median"]


def cpu_name() -> str:
    """The CPU model and torch's kernel capability (AVX2 / AVX512: the machine kind of scripts/verify.py)."""
    from vadbench.machine import cpu_model

    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} logical cores)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 round of 5 repeats, no results file")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.repeats, args.warmup = 1, 5, 2
    torch.set_num_threads(args.threads)
    cpu_image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    names = ["efficientad_s", "efficientad_m"]
    models = {n: build(n, args.size) for n in names}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU whenever there is one
    load_before = os.getloadavg()[0]
    rows = []
    for device in devices:
        image = cpu_image.to(device)
        rounds: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names:
                rounds[n].append(median_ms(models[n].to(device), image, args.warmup, args.repeats))
                print(f"round {r}: {n} on {device} {rounds[n][-1]:.1f} ms")
        where = cpu_name() if device == "cpu" else torch.cuda.get_device_name()
        for n, v in rounds.items():
            learned = sum(t.numel() for t in models[n].learned_state().values())
            rows.append(
                f"| {n} | {where} | {statistics.median(v):.1f} | {min(v):.1f}–{max(v):.1f} | {learned / 1e6:.1f} |"
            )
    load_after = os.getloadavg()[0]
    text = "\n".join(
        [
            "# EfficientAD latency (batch 1)",
            "",
            f"`benchmarks/bench_efficientad_latency.py`: `model.predict` on one 3×{args.size}×{args.size} image, "
            f"{args.threads} torch threads, {args.warmup} warm-up calls, median of {args.repeats} calls per round, "
            f"{args.rounds} rounds alternating the sizes (median and range of the round medians). fp32, "
            f"torch {torch.__version__}; a GPU row appears whenever CUDA is present "
            f"({'CUDA present' if torch.cuda.is_available() else 'no CUDA device in this run'}). 1-minute load average "
            f"{load_before:.2f} before the run, {load_after:.2f} after it (its own threads included; well above 0 "
            "before it, other work shared the cores and the times are upper bounds).",
            "",
            "| model | device | latency ms (median) | range over rounds | learned parameters (M) |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "The paper reports 2.2 ms (S) and 4.5 ms (M) on an NVIDIA RTX A6000 GPU (fp16): the PDNs are",
            "small for a GPU but several GMAC per image for two CPU cores. Teacher, student and autoencoder",
            "all run at inference; the backbone does not (it only supplies the input normalisation).",
            "",
        ]
    )
    print(text)
    if not args.quick:
        from vadbench.io import atomic_file

        with atomic_file(ROOT / "benchmarks" / "results" / "efficientad_latency.md", "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
