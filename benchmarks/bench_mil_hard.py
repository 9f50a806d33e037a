"""MIL on a demo cohort with ground truth: slide AUC, heatmap top-decile hits, weak-seg Dice.

    python benchmarks/bench_mil_hard.py RUN MANIFEST [--cohort demo] [--out results.md]

For every trained model in RUN/mil/{model}/{cohort}/:
  - CV AUC with its 95% CI (metrics.json, pooled out-of-fold predictions) and the folds' best epochs
    (how many stopped at the epoch cap);
  - top decile: per lesion slide, the fold ensemble's per-patch scores (as the heatmap stage computes
    them: training.inference.ensemble_predict) are ranked; k = ceil(10% of the slide's patches).
    hits = lesion patches (>= 50% of the patch on the truth mask) among the top k; a perfect map gets
    min(k, n_lesion). Reported: sum(hits) / sum(perfect) over the lesion slides with >= 1 lesion patch.
    With lesions of 1-4 patches a decile (~12 patches) is lenient, so also: top-n recall, the share of
    a slide's n lesion patches that are its n top-scored patches (pooled over slides).
With RUN/segment/ (the segment stage): mean Dice on lesion slides (its metrics.csv) and the share of
normal tissue marked: mask pixels outside the lesion over tissue pixels outside the lesion, pooled over
all slides (tissue = the tile stage's patches, lesion = the truth mask), and on the slides without a
lesion alone (false alarms, where the rest is outline around a lesion).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsi_pipeline.run.manifest import load_manifest  # noqa: E402
from wsi_pipeline.run.folder import RunFolder  # noqa: E402


def truth_of(slide_path: Path):
    sidecar = Path(f"{slide_path.with_suffix('')}.truth.json")
    truth = json.loads(sidecar.read_text())
    mask = np.asarray(Image.open(sidecar.parent / truth["lesion_mask"])) > 0
    return truth, mask, int(truth["lesion_mask_downsample"])


def lesion_fraction(coords: np.ndarray, size0: float, mask: np.ndarray, ds: int) -> np.ndarray:
    out = np.zeros(len(coords))
    for i, (x, y) in enumerate(coords):
        x0, y0 = int(x // ds), int(y // ds)
        x1, y1 = int(math.ceil((x + size0) / ds)), int(math.ceil((y + size0) / ds))
        sub = mask[y0:y1, x0:x1]
        out[i] = sub.mean() if sub.size else 0.0
    return out


def top_decile(model_dir: Path, run: RunFolder, records, encoder: str) -> tuple[float, int]:
    from wsi_pipeline.training.bags import load_bag
    from wsi_pipeline.training.checkpoints import load_ensemble
    from wsi_pipeline.training.inference import ensemble_predict

    ensemble = load_ensemble(model_dir)
    hits = perfect = n = strict_hits = n_lesion_total = 0
    for r in records:
        truth, mask, ds = truth_of(r.path)
        if not truth["positive"]:
            continue
        features, coords, attrs = load_bag(run.features_h5(encoder, r.slide_id), r.slide_id)
        lesion = lesion_fraction(coords, float(attrs["patch_size_level0"]), mask, ds) >= 0.5
        if not lesion.any():
            continue
        scores = ensemble_predict(ensemble, features, coords).instance_scores
        k = math.ceil(0.1 * len(scores))
        top = np.argsort(-scores, kind="stable")[:k]
        hits += int(lesion[top].sum())
        perfect += min(k, int(lesion.sum()))
        n += 1
        # Stricter: of the slide's n lesion patches, how many are its n top-scored patches.
        strict_hits += int(lesion[np.argsort(-scores, kind="stable")[:int(lesion.sum())]].sum())
        n_lesion_total += int(lesion.sum())
    return (hits / perfect if perfect else float("nan")), n, (strict_hits / n_lesion_total if n_lesion_total else float("nan"))


def segment_stats(run_dir: Path, records, run: RunFolder, encoder: str):
    import csv

    import tifffile

    seg = run_dir / "segment"
    if not (seg / "metrics.csv").is_file():
        return None
    with open(seg / "metrics.csv") as fh:
        rows = {row["slide_id"]: row for row in csv.DictReader(fh)}
    dice = [float(rows[r.slide_id]["dice"]) for r in records
            if r.slide_id in rows and float(rows[r.slide_id]["truth_lesion_um2"]) > 0]
    marked = tissue = marked_neg = tissue_neg = 0
    for r in records:
        tif = seg / f"{r.slide_id}.tif"
        if not tif.is_file():
            continue
        truth, mask, ds = truth_of(r.path)
        with tifffile.TiffFile(tif) as t:
            pred = t.pages[0].asarray()
        pred = (pred[..., 0] if pred.ndim == 3 else pred) > 127
        # Tissue: the tiled patches, painted on the prediction's grid.
        from wsi_pipeline.training.bags import load_bag

        _, coords, attrs = load_bag(run.features_h5(encoder, r.slide_id), r.slide_id)
        down = truth["level0_width"] / pred.shape[1]
        size = float(attrs["patch_size_level0"]) / down
        tissue_m = np.zeros(pred.shape, bool)
        for x, y in coords / down:
            tissue_m[int(y):int(math.ceil(y + size)), int(x):int(math.ceil(x + size))] = True
        les = np.array(Image.fromarray(mask.astype(np.uint8) * 255).resize(pred.shape[::-1], Image.NEAREST)) > 0
        normal = tissue_m & ~les
        marked += int((pred & normal).sum())
        tissue += int(normal.sum())
        if not les.any():   # slides without a lesion: marks there are false alarms, not outlines
            marked_neg += int((pred & normal).sum())
            tissue_neg += int(normal.sum())
    return {"dice_mean": float(np.mean(dice)) if dice else float("nan"), "n_lesion_slides": len(dice),
            "normal_marked_pct": 100.0 * marked / tissue if tissue else float("nan"),
            "lesion_free_marked_pct": 100.0 * marked_neg / tissue_neg if tissue_neg else float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("manifest")
    ap.add_argument("--cohort", default="demo")
    ap.add_argument("--encoder", default="stain_texture")
    ap.add_argument("--label", default="", help="a column value naming this run (e.g. 'hard, standardised')")
    ap.add_argument("--models", default=None, type=lambda v: v.split(","), help="only these models")
    ap.add_argument("--no-segment", action="store_true", help="skip the segment/ statistics")
    ap.add_argument("--out", default=None, help="append the table rows to this markdown file")
    args = ap.parse_args(argv)
    run_dir = Path(args.run)
    run = RunFolder(run_dir)
    records = [r for r in load_manifest(args.manifest, require_labels=True) if r.cohort == args.cohort]
    lines = ["| run | model | CV AUC [95% CI] | folds at epoch cap | top-decile hits / perfect (lesion slides) "
             "| top-n (n = lesion patches) recall |",
             "|---|---|---|---|---|---|"]
    for model_dir in sorted((run_dir / "mil").glob(f"*/{args.cohort}")):
        if not (model_dir / "metrics.json").is_file() or (args.models and model_dir.parent.name not in args.models):
            continue
        metrics = json.loads((model_dir / "metrics.json").read_text())
        auc = metrics["pooled"]["auc"]
        ci = auc.get("ci95") or [float("nan")] * 2
        capped, n_folds = 0, 0
        for cfg_path in sorted(model_dir.glob("fold_*/config.json")):
            meta = json.loads(cfg_path.read_text())
            n_folds += 1
            capped += int(meta["epochs_run"] == meta["train_config"]["epochs"] and not meta["stopped_early"])
        ratio, n, strict = top_decile(model_dir, run, records, args.encoder)
        lines.append(f"| {args.label} | {model_dir.parent.name} | {auc['value']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] "
                     f"| {capped}/{n_folds} | {ratio:.2f} ({n}) | {strict:.2f} |")
    seg = None if args.no_segment else segment_stats(run_dir, records, run, args.encoder)
    if seg:
        lines.append("")
        lines.append(f"segment ({args.label}): mean Dice on {seg['n_lesion_slides']} lesion slides "
                     f"{seg['dice_mean']:.3f}; normal tissue marked {seg['normal_marked_pct']:.2f}% "
                     f"(on slides without a lesion {seg['lesion_free_marked_pct']:.2f}%)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(text + "\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
