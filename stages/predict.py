"""`wsi-pipeline predict`: apply a trained fold ensemble to every slide of a manifest with features.

Reads the fold models of RUN/mil/{model}/{cohort}/ (`--model-dir`), the encoder they were trained on
(from their config.json) and each slide's RUN/features/{encoder}/{slide_id}.h5; writes one CSV
(slide_id, prob_<class>..., predicted) atomically. The probabilities are the mean of the folds'
softmax outputs (`training.inference.ensemble_predict`); `predicted` is the class with the highest.
Slides without usable features (missing, unreadable, non-finite, wrong dimension) are reported and
skipped: the CSV holds the others and the command exits 1.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from wsi_pipeline.errors import PipelineError
from wsi_pipeline.manifest import Manifest


def add_arguments(p) -> None:
    p.add_argument("--manifest", required=True, help="slide manifest CSV (labels not needed)")
    p.add_argument("--run", required=True, metavar="RUN", help="run folder holding features/{encoder}/")
    p.add_argument("--model-dir", required=True, help="trained cohort folder RUN/mil/{model}/{cohort}")
    p.add_argument("--out", default=None, metavar="CSV",
                   help="output CSV (default: MODEL_DIR/predictions_<manifest name>.csv)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class PredictReport:
    out: Path
    classes: list
    predicted: list = field(default_factory=list)     # slide ids written to the CSV
    skipped: dict = field(default_factory=dict)       # slide_id -> reason


def default_out(model_dir: str | Path, manifest_path: str | Path) -> Path:
    return Path(model_dir) / f"predictions_{Path(manifest_path).stem}.csv"


def run_predict(manifest: Manifest, run_dir: str | Path, model_dir: str | Path, out: str | Path | None = None,
                *, device: str = "auto", progress: bool = True) -> PredictReport:
    """Fold-ensemble probabilities for every slide of `manifest` that has features → CSV at `out`."""
    from tqdm import tqdm

    from wsi_pipeline.errors import SlideError
    from wsi_pipeline.io import write_csv_atomic
    from wsi_pipeline.names import check_name
    from wsi_pipeline.run_folder import RunFolder
    from wsi_pipeline.training.bags import load_bag
    from wsi_pipeline.training.checkpoints import load_ensemble
    from wsi_pipeline.training.inference import ensemble_predict
    from wsi_pipeline.training.trainer import resolve_device

    ensemble = load_ensemble(model_dir, device=resolve_device(device))
    meta = ensemble[0][1]
    classes, in_dim = list(meta["classes"]), int(meta["in_dim"])
    encoder = meta.get("encoder")
    if not encoder:
        raise PipelineError(f"{model_dir}: fold config.json does not name the encoder its features came from")
    # The encoder names the folder features are read from: a safe name only, never a path.
    check_name(encoder, f"{model_dir}: fold config.json encoder", error=PipelineError)
    out = Path(out) if out is not None else default_out(model_dir, manifest.path)
    run = RunFolder(run_dir)
    report = PredictReport(out=out, classes=classes)
    rows = []
    for record in tqdm(list(manifest), desc="predict", unit="slide", disable=not progress, dynamic_ncols=True):
        try:
            features, coords, _ = load_bag(run.features_h5(encoder, record.slide_id), record.slide_id)
            if features.shape[1] != in_dim:
                raise SlideError(record.slide_id, f"features have D={features.shape[1]}, the models "
                                                  f"expect {in_dim} (encoder {encoder!r})")
        except SlideError as exc:
            report.skipped[record.slide_id] = str(exc)
            continue
        result = ensemble_predict(ensemble, features, coords)
        rows.append([record.slide_id, *[float(p) for p in result.probs], classes[int(result.probs.argmax())]])
        report.predicted.append(record.slide_id)
    write_csv_atomic(out, ["slide_id", *[f"prob_{c}" for c in classes], "predicted"], rows)
    return report


def cli(args) -> int:
    from wsi_pipeline.manifest import load_manifest

    try:
        manifest = load_manifest(args.manifest)
        report = run_predict(manifest, args.run, args.model_dir, args.out, device=args.device,
                             progress=not args.no_progress)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"predict: {len(report.predicted)} slide(s) -> {report.out}")
    if report.skipped:
        print(f"{len(report.skipped)} slide(s) skipped:", file=sys.stderr)
        for reason in report.skipped.values():
            print(f"  {reason}", file=sys.stderr)
        return 1
    return 0
