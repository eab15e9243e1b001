"""Command line: `vadbench validate`, `vadbench profile`, and the error handling every stage shares."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vadbench import config
from vadbench.config import NO_BACKBONE, Params, ParamsError, load_params

# Errors a user can fix from the message alone: print it, no traceback.
USER_ERRORS = (ParamsError, FileNotFoundError, ValueError, KeyError, RuntimeError)


def stage_main(
    run: Callable[..., Any],
    argv: list[str] | None = None,
    n_args: int = 0,
    *,
    validated_cache: Path | None = None,
    uses_torch: bool = True,
) -> None:
    """Entry point of a stage script: validate params.yaml first, then `run(params, *args)`.

    `validated_cache`: see `config.load_params` (the always-run `check` stage). `uses_torch=False`: the stage
    never imports torch, so its thread count is not pinned (importing torch alone costs ~2 s).
    Exit 2 on invalid params or arguments (nothing written), 1 on any other failure.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = sys.argv[1:] if argv is None else argv
    stage = Path(sys.argv[0]).stem
    if len(args) != n_args:
        print(f"error: stage {stage} takes {n_args} argument(s), got {args}", file=sys.stderr)
        raise SystemExit(2)
    try:
        params = config.load_params(os.environ.get("VADBENCH_PARAMS", "params.yaml"), validated_cache)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if uses_torch:
        import torch

        from vadbench.data.source import set_loader_workers

        if getattr(params, "threads", None):
            torch.set_num_threads(params.threads)  # pinned: CPU results depend on the intra-op thread count
        set_loader_workers(getattr(params, "loader_workers", 0))
    try:
        run(params, *args)
    except USER_ERRORS as err:
        if os.environ.get("VADBENCH_DEBUG"):
            traceback.print_exc()
        print(f"error in stage {stage}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as err:  # disk full, read-only or permission-denied outputs: one line, naming the file
        if os.environ.get("VADBENCH_DEBUG"):
            traceback.print_exc()
        print(f"error in stage {stage}: {describe_os_error(err)}", file=sys.stderr)
        raise SystemExit(1) from None


def describe_os_error(err: OSError) -> str:
    """One line naming the file and the cause of an OSError, with what to do about it."""
    import errno

    where = err.filename or "an output file"
    fixes = {
        errno.ENOSPC: "the disk is full: free space (or move data/ and DVC's cache to a larger disk) and rerun",
        errno.EDQUOT: "the disk quota is exceeded: free space and rerun",
        errno.EROFS: "the file system is read-only: run from a writable checkout",
        errno.EACCES: "permission denied: make the directory writable for this user (or run elsewhere)",
        errno.EPERM: "operation not permitted: check the directory's owner and permissions",
    }
    cause = fixes.get(err.errno or -1)
    if cause is None and "requested and" in str(err) and "written" in str(err):
        cause = fixes[errno.ENOSPC]  # numpy/torch short writes: "N requested and M written"
    return f"{where}: {cause or err.strerror or err}"


def require_in_grid(params: Params, dataset: str, model: str | None = None, backbone: str | None = None) -> None:
    """Stop unless `dataset` is in run.datasets and, given a model, (dataset, model, backbone) is a cell of
    the run grid (see `RunGrid.cells`)."""
    if dataset not in params.run.datasets:
        raise ParamsError(f"dataset {dataset!r} is not in run.datasets {params.run.datasets}")
    if model is not None and (dataset, model, backbone) not in params.run.cells():
        run = params.run
        raise ParamsError(
            f"cell {dataset}-{model}-{backbone} is not in the run grid: run.datasets {run.datasets}, run.models "
            f"{run.models} × run.backbones {run.backbones}, run.pixel_models {run.pixel_models} × backbone "
            f"{NO_BACKBONE!r}"
        )


def _validate(ns: argparse.Namespace) -> int:
    try:
        params = load_params(ns.params)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run = params.run
    print(
        f"{ns.params}: OK — {len(run.datasets)} dataset(s) × ({len(run.models)} model(s) × "
        f"{len(run.backbones)} backbone(s) + {len(run.pixel_models)} pixel model(s)) = {len(run.cells())} cells"
    )
    return 0


def _profile(ns: argparse.Namespace) -> int:
    """Copy a named profile over params.yaml (after validating it)."""
    src = Path(ns.profiles_dir) / f"{ns.name}.yaml"
    if not src.is_file():
        names = sorted(p.stem for p in Path(ns.profiles_dir).glob("*.yaml"))
        print(f"error: no profile {src}; available: {names}", file=sys.stderr)
        return 2
    try:
        load_params(src)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from vadbench.io import write_text

    write_text(Path(ns.params), src.read_text())
    print(f"{ns.params} ← {src}. Run `dvc repro` (or `dvc exp run`) to use it.")
    return 0


def _key_params(cls: type, names: list[str] | None = None, limit: int = 6) -> str:
    """`field=default` of a pydantic class's `names` (default: its first fields, the ones changed most)."""
    names = [n for n in (names or list(cls.model_fields)) if n not in ("seed", "kind")][:limit]
    parts = []
    for name in names:
        field = cls.model_fields[name]
        default = "<required>" if field.is_required() else field.get_default(call_default_factory=True)
        parts.append(f"{name}={default}")
    return ", ".join(parts)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].rstrip(".") if doc and doc.strip() else ""


def _list(ns: argparse.Namespace) -> int:
    """One line per model / dataset kind / configured backbone: what it is and its key params."""
    if ns.what == "models":
        from vadbench.models import model_class, model_names

        for name in model_names():
            cls = model_class(name)
            module_doc = _first_line(sys.modules[cls.__module__].__doc__)
            level = "pixel maps" if cls.has_pixel_maps else "image level"
            source = "backbone" if cls.needs_backbone else "pixels, no backbone"
            print(f"{name:22s} {module_doc} [{level}; {source}] — {_key_params(cls.Params)}")
    elif ns.what == "datasets":
        import typing

        from vadbench.data.params import DatasetSpec, InputPolicy, RealDatasetParams

        union = typing.get_args(typing.get_args(DatasetSpec)[0])
        for cls in union:
            kind = cls.model_fields["kind"].default
            base = RealDatasetParams if issubclass(cls, RealDatasetParams) else InputPolicy
            own = [f for f in cls.model_fields if f not in base.model_fields]
            print(f"{kind:14s} {_first_line(cls.__doc__)} — {_key_params(cls, ['image_size', *own], limit=7)}")
        try:
            params = load_params(ns.params)
        except ParamsError:
            return 0
        for name, spec in params.datasets.items():
            used = "in run" if name in params.run.datasets else "defined"
            print(f"  {name}: kind {spec.kind}, image_size {spec.image_size} ({used}, {ns.params})")
    else:
        from vadbench.backbones.weights import INITS

        print(f"weight sources (init): {', '.join(INITS)}; architectures: any timm model name")
        try:
            params = load_params(ns.params)
        except ParamsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for name, spec in params.backbones.items():
            used = "in run" if name in params.run.backbones else "defined"
            where = f", file {spec.file}" if spec.file else ""
            print(f"{name:12s} {spec.arch} init {spec.init}{where} ({used})")
    return 0


def _cell_settings(ns: argparse.Namespace) -> dict[str, Any]:
    """What `predict` / `export` take from params.yaml (defaults when the file is absent): seed, device,
    threshold quantile, batch size, threads, the dataset's max_pixels, and the pipeline's folders under --root."""
    from vadbench import layout
    from vadbench.config import AggregateParams, ScoreParams
    from vadbench.predict import DEFAULT_MAX_PIXELS, split_cell

    dataset = split_cell(ns.cell)[0]
    params = load_params(ns.params) if Path(ns.params).is_file() else None
    root = Path(ns.root)
    spec = params.datasets.get(dataset) if params is not None else None
    return {
        "seed": ns.seed if ns.seed is not None else (params.run.seeds[0] if params is not None else 0),
        "device": ns.device or (params.device if params is not None else "auto"),
        "quantile": (params.aggregate if params is not None else AggregateParams()).threshold_quantile,
        "batch_size": ns.batch_size or (params.score if params is not None else ScoreParams()).batch_size,
        "max_pixels": getattr(spec, "max_pixels", DEFAULT_MAX_PIXELS),
        "threads": getattr(params, "threads", None),
        "fits": root / layout.FITS,
        "prepared": root / layout.PREPARED,
        "backbones": root / layout.BACKBONES,
        "scores": root / layout.SCORES,
    }


def _load_cell(ns: argparse.Namespace, device: str | None = None):
    import torch

    from vadbench.predict import load_fitted_cell

    s = _cell_settings(ns)
    if s["threads"]:
        torch.set_num_threads(s["threads"])  # as the stages: CPU results depend on the intra-op thread count
    return load_fitted_cell(
        ns.cell,
        fits=s["fits"],
        prepared=s["prepared"],
        backbones=s["backbones"],
        scores=s["scores"],
        seed=s["seed"],
        device=device or s["device"],
        quantile=s["quantile"],
        batch_size=s["batch_size"],
        max_pixels=s["max_pixels"],
    ), s


def _user_error(command: str, err: Exception) -> int:
    if os.environ.get("VADBENCH_DEBUG"):
        traceback.print_exc()
    text = describe_os_error(err) if isinstance(err, OSError) and err.errno else str(err)
    print(f"error in {command}: {text}", file=sys.stderr)
    return 2


def _predict(ns: argparse.Namespace) -> int:
    """Score new images with a fitted cell: scores.csv + overlays; exit 1 when some file could not be decoded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vadbench.predict import predict_files

    try:
        fitted, s = _load_cell(ns)
        out = Path(ns.out) if ns.out else Path("predictions") / f"{ns.cell}-seed{fitted.seed}"
        summary = predict_files(
            fitted, ns.paths, out, batch_size=s["batch_size"], overlays=not ns.no_overlays, progress=not ns.quiet
        )
    except (*USER_ERRORS, OSError) as err:
        return _user_error("predict", err)
    thr = "no threshold" if summary["threshold"] is None else f"threshold {summary['threshold']:.6g}"
    print(
        f"predict {ns.cell} seed {fitted.seed}: {summary['n_scored']} image(s) scored, {summary['n_anomalous']} "
        f"anomalous ({thr}, from {summary['threshold_source']}), {summary['n_failed']} could not be decoded → "
        f"{summary['scores_csv']}"
    )
    return 1 if summary["n_failed"] else 0


def _export(ns: argparse.Namespace) -> int:
    """Export a fitted cell's inference path as one TorchScript / ONNX graph (parity-checked before writing)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vadbench import export

    if ns.list:
        from vadbench.models import model_names

        for name in model_names():
            for fmt in export.FORMATS:
                reason = export.not_exportable_reason(name, fmt)
                print(
                    f"{name:22s} {fmt:12s} {'exportable (parity checked on every export)' if reason is None else 'NOT exportable: ' + reason}"
                )
        return 0
    if not ns.cell or not ns.format:
        print("error in export: --cell and --format are required (or --list)", file=sys.stderr)
        return 2
    try:
        model_name = export.split_model(ns.cell)
        reason = export.not_exportable_reason(model_name, ns.format)
        if reason is not None:
            raise export.ExportError(f"model {model_name!r} cannot be exported to {ns.format}: {reason}")
        fitted, _ = _load_cell(ns, device="cpu")
        out = Path(ns.out) if ns.out else Path("exports") / f"{ns.cell}-seed{fitted.seed}{export.SUFFIX[ns.format]}"
        meta = export.export_cell(fitted, ns.format, out, input_dtype=ns.input_dtype)
    except (*USER_ERRORS, OSError) as err:
        return _user_error("export", err)
    p = meta["parity"]
    print(
        f"export {ns.cell} seed {fitted.seed} → {out} ({ns.format}; parity on CPU: scores {p['scores']:.2g}, "
        f"maps {p['maps']:.2g} ≤ {p['tolerance']:.2g})"
    )
    return 0


def _cell_args(p: argparse.ArgumentParser, *, cell_required: bool = True) -> None:
    p.add_argument(
        "--cell", required=cell_required, help="<dataset>-<model>-<backbone>, e.g. synthetic_sem-padim-fractal"
    )
    p.add_argument("--seed", type=int, default=None, help="which fitted seed (default: run.seeds[0])")
    p.add_argument("--params", default="params.yaml", help="threshold quantile, batch size, device, threads")
    p.add_argument("--root", default=".", help="the pipeline checkout holding data/fits, data/prepared, ...")
    p.add_argument("--batch-size", type=int, default=None, help="default: score.batch_size")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vadbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check params.yaml (types, ranges, names) without running anything")
    p.add_argument("params", nargs="?", default="params.yaml")
    p.set_defaults(func=_validate)
    p = sub.add_parser("profile", help="replace params.yaml with a profile from profiles/ (e.g. paper)")
    p.add_argument("name")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--profiles-dir", default="profiles")
    p.set_defaults(func=_profile)
    p = sub.add_parser("list", help="one line per model, dataset kind or configured backbone")
    p.add_argument("what", choices=("models", "datasets", "backbones"))
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=_list)
    p = sub.add_parser("predict", help="score new images with a fitted cell: scores.csv + heat-map overlays")
    _cell_args(p)
    p.add_argument("paths", nargs="+", type=Path, help="image files or folders (searched recursively)")
    p.add_argument("--out", default=None, help="output folder (default predictions/<cell>-seed<s>)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:N] (default: params.yaml device)")
    p.add_argument("--no-overlays", action="store_true", help="scores.csv only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)
    p = sub.add_parser("export", help="a fitted cell as one TorchScript or ONNX graph (parity-checked)")
    _cell_args(p, cell_required=False)
    p.add_argument("--format", choices=("torchscript", "onnx"))
    p.add_argument("--out", default=None, help="output file (default exports/<cell>-seed<s>.pt|.onnx)")
    p.add_argument("--input-dtype", choices=("uint8", "float32"), default="uint8", help="ONNX input dtype")
    p.add_argument("--list", action="store_true", help="which models export to which format, and why not")
    p.set_defaults(func=_export, device=None)
    ns = parser.parse_args(argv)
    return int(ns.func(ns))


if __name__ == "__main__":
    raise SystemExit(main())
