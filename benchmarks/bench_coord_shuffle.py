"""Does the spatial layout carry signal for the order-dependent aggregators? CV AUC with the true
patch layout vs with it destroyed (issue 29, item 5).

    python benchmarks/bench_coord_shuffle.py MANIFEST FEATURES_RUN OUT [--config configs/demo.yaml]
        [--models mambamil gmmamba fmamil mammil] [--folds 5] [--epochs N] [--seed 0]
        [--out-md benchmarks/results/coord_shuffle.md]

FEATURES_RUN is a run folder with tiles and features (``wsi-pipeline run ... --no-train``, e.g. on
``wsi-pipeline demo-cohort DIR --hard``); training goes to OUT/{true,shuffled}/ (its own run folders:
nothing in FEATURES_RUN is written). For each model, the same cross-validation (same config, splits
and seed) runs twice through the pipeline's own ``cross_validate``:

- ``true``: the bags as the features.h5 files hold them;
- ``shuffled``: per slide, with a seeded generator, the coordinates are permuted across the patches
  (every patch keeps its features but gets another patch's position) and the bag is put in a random
  order. Both, because the models read the layout in different ways: MambaMIL (``scan: bag``) only
  through the bag order (the tiling's raster order), GMMamba through k-means groups of the coords and
  the bag order inside each group, FMaMIL through the patch grid built from the coords, MamMIL
  through the kNN graph, its spanning-tree orders and the bag order (its identity scan).

Reported: pooled out-of-fold AUC with its 95% CI for both, and the difference. A model that does not
lose AUC when its layout is destroyed is not using the layout on this cohort (the hard demo's
lesions are 1-4 patches: a per-patch signal that needs no layout). ``--models`` takes any registered
aggregator (add ``twodmamba`` when it exists); add ``abmil`` as a control: it is permutation
invariant and ignores coords, so its Δ is the run-to-run noise of training on reordered bags (dropout
masks fall on other instances). Reduced ``--folds`` / ``--epochs`` are stated in the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsi_pipeline.run.config import load_config  # noqa: E402
from wsi_pipeline.run.manifest import load_manifest  # noqa: E402
from wsi_pipeline.run.folder import RunFolder  # noqa: E402
from wsi_pipeline.training import cv  # noqa: E402

DEFAULT_MODELS = ("mambamil", "gmmamba", "fmamil", "mammil")


def shuffled_bags(load_bags, seed: int):
    """Wrap cv._load_bags so every bag comes back with its layout destroyed (module docstring)."""

    def load(records, classes, encoder, features_run):
        bags, dims, problems = load_bags(records, classes, encoder, features_run)
        for slide_id, bag in bags.items():
            digest = int.from_bytes(slide_id.encode()[:8].ljust(8, b"\0"), "little")
            rng = np.random.default_rng([seed, digest])
            n = len(bag.features)
            order, positions = rng.permutation(n), rng.permutation(n)
            bags[slide_id] = dataclasses.replace(bag, features=bag.features[order],
                                                 coords=bag.coords[positions])
        return bags, dims, problems

    return load


def run_condition(manifest, cfg, features_run, out: Path, model: str, shuffle: bool, seed: int) -> dict:
    original = cv._load_bags
    if shuffle:
        cv._load_bags = shuffled_bags(original, seed)
    try:
        start = time.time()
        results = cv.cross_validate(manifest, cfg, RunFolder(out), features_run, model, progress=False)
    finally:
        cv._load_bags = original
    (cohort, result), = results.items()
    if result["status"] != "done":
        return {"error": result.get("error", "failed"), "minutes": (time.time() - start) / 60}
    auc = result["metrics"]["auc"]
    return {"auc": auc["value"], "ci": auc["ci95"], "minutes": (time.time() - start) / 60, "cohort": cohort}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("features_run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--folds", type=int, default=None, help="override train.folds")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs (and cap patience)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the permutations")
    parser.add_argument("--out-md", type=Path, default=Path(__file__).parent / "results" / "coord_shuffle.md")
    args = parser.parse_args()

    cfg = load_config(args.config)
    overrides = {}
    if args.folds:
        overrides["folds"] = args.folds
    if args.epochs:
        overrides["epochs"] = args.epochs
        overrides["patience"] = min(cfg.train.patience, args.epochs)
    if overrides:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))
    manifest = load_manifest(args.manifest, require_labels=True)
    features_run = RunFolder(args.features_run)
    rows = []
    for model in args.models:
        row = {"model": model}
        for condition in ("true", "shuffled"):
            row[condition] = run_condition(manifest, cfg, features_run, args.out / condition, model,
                                           condition == "shuffled", args.seed)
            print(json.dumps({"model": model, "condition": condition, **row[condition]}), flush=True)
        rows.append(row)
        write_report(args, cfg, rows)


def fmt(result: dict) -> str:
    if "error" in result:
        return f"failed: {result['error'][:60]}"
    ci = result.get("ci")
    return f"{result['auc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def write_report(args, cfg, rows) -> None:
    lines = ["# Coordinate shuffle: CV AUC with the true patch layout vs destroyed", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} "
             "(shared machine). Manifest " + str(args.manifest) + f", config {args.config.name}, folds "
             f"{cfg.train.folds}, epochs {cfg.train.epochs}, patience {cfg.train.patience}, permutation seed "
             f"{args.seed}.", "",
             "| model | true layout AUC [95% CI] | shuffled AUC [95% CI] | Δ AUC | minutes (true / shuffled) |",
             "|---|---|---|---:|---|"]
    for row in rows:
        true, shuffled = row["true"], row["shuffled"]
        delta = (f"{shuffled['auc'] - true['auc']:+.3f}" if "auc" in true and "auc" in shuffled
                 and true["auc"] is not None and shuffled["auc"] is not None else "–")
        lines.append(f"| {row['model']} | {fmt(true)} | {fmt(shuffled)} | {delta} | "
                     f"{true['minutes']:.0f} / {shuffled['minutes']:.0f} |")
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
