"""`vadbench export`: a fitted cell's whole inference path as one TorchScript or ONNX graph.

The graph takes an image batch (B, C, H, W) at the cell's input size — uint8 in 0..255 or float in [0, 1]
(TorchScript: either, decided at run time; ONNX: the dtype chosen at export) — and returns
``(scores (B,), maps (B, H, W))`` float32: the dtype conversion, a bilinear resize to the cell's size (an
identity at that size; TorchScript only), the backbone's normalisation, the backbone, the model, the map
upsampling and smoothing are all inside. The decision is NOT: the cell's validation threshold and the
preprocessing constants travel as metadata (TorchScript ``_extra_files["vadbench.json"]``, ONNX
``metadata_props``) so a deployment can choose its own operating point.

How: the model's own `predict` is traced at batch 1 (so the chunking a model does by batch size, fiber
count or bank size is traced at the one size it will always see) and the graph loops over the batch. A
trace bakes Python control flow, so every export is checked against the eager model on a second batch
before it is written (`ExportError` past `tolerance`); `tests/test_export.py` does the same per model.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vadbench.io import atomic_file

FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
META_FILE = "vadbench.json"  # TorchScript extra file / ONNX metadata key holding the cell's metadata
ONNX_OPSET = 17
#: max |exported − eager| accepted for scores and maps on CPU: TOLERANCE, or RELATIVE × the largest |output|
#: when outputs are large (maps of ~50 differ by ~2e-4 between ONNX Runtime's and torch's conv kernels, as
#: much as eager torch differs from itself between batch sizes 1 and 3; docs/DEPLOY.md)
TOLERANCE = 1e-4
RELATIVE = 1e-5

_AA = (
    "it shrinks its grey input with antialiased bilinear interpolation (aten::_upsample_bilinear2d_aa), "
    "which torch's ONNX exporter has no conversion for (opset 17 and 18); TorchScript works"
)
#: registered models whose predict path cannot become one graph of a format: {model: {format: reason}}
NOT_EXPORTABLE: dict[str, dict[str, str]] = {
    "deep_ae": {"onnx": _AA},
    "riad": {"onnx": _AA},
    "iad_inpaint": {"onnx": _AA},
    "ganomaly": {"onnx": _AA},
    "fanogan": {"onnx": _AA},
    "sparse_ae": {"onnx": _AA},
    "fastflow": {
        "onnx": "F.layer_norm(f, f.shape[1:]) takes its normalized_shape from a traced shape, which the ONNX "
        "exporter cannot make a constant inside the batch Loop; TorchScript works"
    },
    "simplenet": {
        "onnx": "its locally aware features pool channels with F.adaptive_avg_pool1d (components/patch_features), "
        "whose input size the ONNX exporter cannot read inside the batch Loop; TorchScript works"
    },
}


class ExportError(RuntimeError):
    """A cell cannot be exported (model not exportable, or the exported graph disagrees with the model)."""


def not_exportable_reason(model_name: str, fmt: str) -> str | None:
    return NOT_EXPORTABLE.get(model_name, {}).get(fmt)


def tolerance_for(reference: tuple[torch.Tensor, torch.Tensor], tolerance: float = TOLERANCE) -> float:
    scale = max(float(t.abs().max()) if t.numel() else 0.0 for t in reference)
    return max(tolerance, RELATIVE * scale)


class _Predict(nn.Module):
    """The model's `predict` as a module: float (1, C, H, W) in [0, 1] → (scores (1,), maps (1, H, W))."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps = self.model.predict(x)
        return scores.float(), maps.float()


class InferenceGraph(nn.Module):
    """uint8 / float batch → dtype conversion → resize to (H, W) → per-image traced `predict` → stacked outputs."""

    def __init__(self, core: nn.Module, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.core = core
        self.channels, self.height, self.width = channels, height, width

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(torch.float32)
        if images.dtype == torch.uint8:
            x = x / 255.0
        if x.shape[-2] != self.height or x.shape[-1] != self.width:
            x = F.interpolate(x, size=(self.height, self.width), mode="bilinear", align_corners=False)
        scores: list[torch.Tensor] = []
        maps: list[torch.Tensor] = []
        for i in range(x.shape[0]):
            # a static per-image shape: ONNX's Loop body then knows every shape (layer_norm needs constants)
            s, m = self.core(x[i : i + 1].reshape(1, self.channels, self.height, self.width))
            scores.append(s)
            maps.append(m)
        return torch.cat(scores), torch.cat(maps)


@dataclass(frozen=True)
class ExportSpec:
    """What the graph needs to know about its cell: input shape, preprocessing, threshold (metadata only)."""

    cell: str
    seed: int
    model: str
    channels: int
    height: int
    width: int
    threshold: float | None
    threshold_source: str
    normalize_mean: list[float] | None
    normalize_std: list[float] | None
    has_pixel_maps: bool

    def metadata(self, fmt: str, input_dtype: str) -> dict[str, Any]:
        return {
            "format": fmt,
            "cell": self.cell,
            "seed": self.seed,
            "model": self.model,
            "input": {
                "shape": ["B", self.channels, self.height, self.width],
                "dtype": input_dtype,
                "range": "0..255 (uint8) or 0..1 (float)",
                "channels": "grey" if self.channels == 1 else "rgb",
            },
            "outputs": {"scores": ["B"], "maps": ["B", self.height, self.width]},
            # applied inside the graph (after grey → 3-channel replication); stored for reference
            "normalize_mean": self.normalize_mean,
            "normalize_std": self.normalize_std,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "decision": "anomalous iff score > threshold (not part of the graph)",
            "has_pixel_maps": self.has_pixel_maps,
            "preprocessing": (
                "decode as `vadbench predict` does (8-bit, grey/RGB as the dataset, bilinear PIL resize to the "
                "dataset's image_size, centre crop); the graph's own resize is torch bilinear, exact only as an "
                "identity at the input size"
            ),
        }


def normalization_of(model: nn.Module) -> tuple[list[float] | None, list[float] | None]:
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "mean"):
        return None, None
    return backbone.mean.flatten().tolist(), backbone.std.flatten().tolist()


def _cpu_copy(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).cpu().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def trace_core(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """`model.predict` traced at batch 1 on CPU (tracer warnings are expected: a trace bakes Python values)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(_Predict(model), example[:1], check_trace=False, strict=False)


def build_graph(model: nn.Module, spec: ExportSpec, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The scripted `InferenceGraph` of `model` (a CPU copy; `example` float (B, C, H, W) in [0, 1])."""
    core = trace_core(_cpu_copy(model), example.float().cpu())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript (still supported)
        return torch.jit.script(InferenceGraph(core, spec.channels, spec.height, spec.width))


def example_batch(spec: ExportSpec, n: int = 3, seed: int = 0) -> torch.Tensor:
    """A float (n, C, H, W) batch in [0, 1] of 8-bit levels (what decoded images give)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, spec.channels, spec.height, spec.width), generator=gen).float() / 255.0


def max_differences(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    (sa, ma), (sb, mb) = a, b
    if sa.shape != sb.shape or ma.shape != mb.shape:
        raise ExportError(
            f"exported outputs {tuple(sb.shape)}, {tuple(mb.shape)} ≠ torch {tuple(sa.shape)}, {tuple(ma.shape)}"
        )
    return {
        "scores": float((sa.double() - sb.double()).abs().max()),
        "maps": float((ma.double() - mb.double()).abs().max()),
    }


def _check(name: str, diffs: dict[str, float], tolerance: float) -> None:
    worst = max(diffs.values())
    if not worst <= tolerance:  # NaN fails too
        raise ExportError(
            f"the exported {name} graph differs from the torch model by {worst:.3g} (scores {diffs['scores']:.3g}, "
            f"maps {diffs['maps']:.3g}) > {tolerance:g}: not written"
        )


def run_onnx(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an exported ONNX file with ONNX Runtime on CPU → (scores, maps) tensors."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.log_severity_level = 3  # errors only: Loop subgraphs make ORT warn about implicit input names
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    scores, maps = session.run(None, {name: images.cpu().numpy()})
    return torch.from_numpy(scores), torch.from_numpy(maps)


def onnx_metadata(path: Path) -> dict[str, Any]:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props[META_FILE])


def torchscript_metadata(path: Path) -> dict[str, Any]:
    extra = {META_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[META_FILE])


def export_model(
    model: nn.Module,
    spec: ExportSpec,
    fmt: str,
    out: Path,
    *,
    input_dtype: str = "uint8",
    tolerance: float = TOLERANCE,
    check_batch: int = 3,
    example: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Export `model` (fitted; any device — a CPU copy is exported) to `out` in `fmt`; check parity first.

    Returns the metadata written, with ``parity`` {scores, maps: max abs difference on a `check_batch`
    batch — `example` (float (B, C, H, W) in [0, 1], e.g. validation normals) or random 8-bit noise}.
    Raises ExportError for a model in `NOT_EXPORTABLE` or a graph that misses `tolerance`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if input_dtype not in ("uint8", "float32"):
        raise ValueError(f"input dtype must be uint8 or float32, got {input_dtype!r}")
    reason = not_exportable_reason(spec.model, fmt)
    if reason is not None:
        raise ExportError(f"model {spec.model!r} cannot be exported to {fmt}: {reason}")
    floats = example_batch(spec, check_batch) if example is None else example.float().cpu()
    inputs = (floats * 255).round().to(torch.uint8) if input_dtype == "uint8" else floats
    cpu_model = _cpu_copy(model)
    with torch.no_grad():
        reference = cpu_model.predict(floats)
    tolerance = tolerance_for(reference, tolerance)
    graph = build_graph(cpu_model, spec, floats)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = spec.metadata(fmt, input_dtype if fmt == "onnx" else "uint8 or float32")
    if fmt == "torchscript":
        with torch.no_grad():
            diffs = max_differences(reference, graph(inputs))
        _check(fmt, diffs, tolerance)
        meta["parity"] = {**diffs, "tolerance": tolerance}
        with atomic_file(out, "wb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(graph, fh, _extra_files={META_FILE: json.dumps(meta, sort_keys=True)})
    else:
        _export_onnx(graph, inputs, out, meta, reference, tolerance)
    return meta


def _export_onnx(
    graph: torch.jit.ScriptModule,
    inputs: torch.Tensor,
    out: Path,
    meta: dict[str, Any],
    reference: tuple[torch.Tensor, torch.Tensor],
    tolerance: float,
) -> None:
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the optional extra: pip install -e '.[onnx]'") from None
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (inputs,),
                str(tmp),
                input_names=["images"],
                output_names=["scores", "maps"],
                dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}, "maps": {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
        diffs = max_differences(reference, run_onnx(tmp, inputs))
        _check("onnx", diffs, tolerance)
        meta["parity"] = {**diffs, "tolerance": tolerance}
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_FILE, json.dumps(meta, sort_keys=True)
        with atomic_file(out, "wb") as fh:
            fh.write(proto.SerializeToString())
    finally:
        tmp.unlink(missing_ok=True)


def split_model(cell: str) -> str:
    from vadbench.predict import split_cell

    return split_cell(cell)[1]


def spec_of(fitted: Any) -> ExportSpec:
    """The `ExportSpec` of a `vadbench.predict.FittedCell`."""
    mean, std = normalization_of(fitted.model)
    side = fitted.input_side
    return ExportSpec(
        cell=fitted.name,
        seed=fitted.seed,
        model=fitted.model.name,
        channels=fitted.channels,
        height=side,
        width=side,
        threshold=fitted.threshold,
        threshold_source=fitted.threshold_source,
        normalize_mean=mean,
        normalize_std=std,
        has_pixel_maps=fitted.model.has_pixel_maps,
    )


def export_cell(fitted: Any, fmt: str, out: Path, *, input_dtype: str = "uint8") -> dict[str, Any]:
    """Export a loaded cell (`vadbench.predict.load_fitted_cell`) to `out`; returns the metadata written.

    Parity is checked on up to 3 validation normals, images like those the graph will see (random noise, the
    fallback without a val split, drives STFPM's normalised maps to ~4·10⁴ on a real cell, where float32
    noise alone is ~10⁻²)."""
    spec = spec_of(fitted)
    images = [fitted.val[i].float() / 255.0 for i in range(min(3, len(fitted.val)))] if fitted.val is not None else []
    example = torch.stack(images) if images else None
    return export_model(fitted.model, spec, fmt, out, input_dtype=input_dtype, example=example)
