"""DVC stage `check` (always runs, first): validate the whole params.yaml, fingerprint local source trees.

Every other stage is downstream of it, so a plain `dvc repro` or `dvc exp run` reports every params error
before any work, even when nothing else would rerun. data/sources/<dataset>.json lists each `folder` /
`data_dir` dataset's files (path, size, SHA-256; hashes cached by size + mtime), so an added, removed or
edited source image reruns that dataset's prepare and its dependants; unchanged trees give byte-identical
files and rerun nothing.
"""

from vadbench import layout
from vadbench.cli import stage_main
from vadbench.config import Params
from vadbench.data.fingerprint import write_fingerprint
from vadbench.io import write_json


def run(params: Params) -> None:
    # params are valid once we get here (stage_main validated them); this file orders the graph after it
    write_json(layout.SOURCES / "params.valid.json", {"valid": True})
    for dataset in params.run.datasets:
        fp = write_fingerprint(
            params.datasets[dataset],
            layout.SOURCES / f"{dataset}.json",
            cache_path=layout.SOURCES_CACHE / f"{dataset}.json",
        )
        if fp:
            n = sum(len(d["files"]) for d in fp.values())
            print(f"check: {dataset}: {n} source file(s) in {len(fp)} dir(s)")
    print(f"check: params.yaml valid; {len(params.run.cells())} cells")


if __name__ == "__main__":
    stage_main(run, validated_cache=layout.SOURCES_CACHE / "params.validated", uses_torch=False)
