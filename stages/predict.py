"""`wsi-pipeline predict`: apply a trained fold ensemble to every slide of a manifest with features.

Reads the fold models of RUN/mil/{model}/{cohort}/ (`--model-dir`), the encoder they were trained on
(from their config.json) and each slide's RUN/features/{encoder}/{slide_id}.h5; writes one CSV
(slide_id, prob_<class>..., predicted) atomically. The probabilities are the mean of the folds'
softmax outputs (`training.inference.ensemble_predict`); `predicted` is the class with the highest.
Slides without usable features (missing, unreadable, non-finite, wrong dimension) are reported and
skipped: the CSV holds the others and the command exits 1. Features the model cannot use (made by
another encoder, weights, µm/px, patch size or modality than its training features, or from another
file than the manifest's: `wsi_pipeline.features.provenance`) refuse the whole command before the CSV is
written: one line per slide naming both sides, exit 2.
"""

from __future__ import annotations

from pathlib import Path

from wsi_pipeline.errors import PipelineError
from wsi_pipeline.run.manifest import Manifest

from .base import CONFIG, NO_PROGRESS, Stage, StageReport, arg

STAGE = "predict"


def default_out(model_dir: str | Path, manifest_path: str | Path) -> Path:
    return Path(model_dir) / f"predictions_{Path(manifest_path).stem}.csv"


def run_predict(manifest: Manifest, run_dir: str | Path, model_dir: str | Path, out: str | Path | None = None,
                *, device: str = "auto", progress: bool = True) -> StageReport:
    """Fold-ensemble probabilities for every slide of `manifest` that has features → CSV at `out`.
    The report: done = slides written; failed = slides without usable features (reason);
    details out (the CSV) and classes."""
    from tqdm import tqdm

    from wsi_pipeline.errors import SlideError
    from wsi_pipeline.features.provenance import check_features, model_training_features
    from wsi_pipeline.io import write_csv_atomic
    from wsi_pipeline.run.folder import RunFolder
    from wsi_pipeline.run.names import check_name
    from wsi_pipeline.training.bags import read_bag
    from wsi_pipeline.training.ensemble import EnsembleCache
    from wsi_pipeline.training.inference import ensemble_predict

    ensemble = EnsembleCache(device).models(model_dir)
    meta = ensemble[0][1]
    classes, in_dim = list(meta["classes"]), int(meta["in_dim"])
    encoder = meta.get("encoder")
    if not encoder:
        raise PipelineError(f"{model_dir}: fold config.json does not name the encoder its features came from")
    # The encoder names the folder features are read from: a safe name only, never a path.
    check_name(encoder, f"{model_dir}: fold config.json encoder", error=PipelineError)
    out = Path(out) if out is not None else default_out(model_dir, manifest.path)
    run = RunFolder(run_dir)
    training = model_training_features(meta)
    unusable = check_features(STAGE, run, manifest, lambda record: training)  # mismatches: raised here
    report = StageReport(STAGE, details={"out": out, "classes": classes}, failures_csv=False)
    rows = []
    for record in tqdm(list(manifest), desc="predict", unit="slide", disable=not progress, dynamic_ncols=True):
        if record.slide_id in unusable:
            report.failed[record.slide_id] = unusable[record.slide_id]
            continue
        try:
            features, coords, _ = read_bag(run.features_h5(encoder, record.slide_id), record.slide_id)
            if features.shape[1] != in_dim:
                raise SlideError(record.slide_id, f"features have D={features.shape[1]}, the models "
                                                  f"expect {in_dim} (encoder {encoder!r})")
        except SlideError as exc:
            report.failed[record.slide_id] = str(exc)
            continue
        result = ensemble_predict(ensemble, features, coords)
        rows.append([record.slide_id, *[float(p) for p in result.probs], classes[int(result.probs.argmax())]])
        report.done.append(record.slide_id)
    write_csv_atomic(out, ["slide_id", *[f"prob_{c}" for c in classes], "predicted"], rows)
    report.notes.append(f"predict: {len(report.done)} slide(s) -> {out}")
    if report.failed:
        report.warnings += [f"{len(report.failed)} slide(s) skipped:", *(f"  {r}" for r in report.failed.values())]
    return report


PREDICT = Stage(
    name=STAGE, sections=("train",), run_arg=("run",),
    run=lambda manifest, cfg, run_dir, **options: run_predict(manifest, run_dir, device=cfg.train.device, **options),
    help="apply a trained fold ensemble to slides with features",
    args=(arg("--manifest", required=True, help="slide manifest CSV (labels not needed)"),
          arg("--run", required=True, metavar="RUN", help="run folder holding features/{encoder}/"),
          arg("--model-dir", required=True, help="trained cohort folder RUN/mil/{model}/{cohort}"),
          arg("--out", default=None, metavar="CSV",
              help="output CSV (default: MODEL_DIR/predictions_<manifest name>.csv)"),
          CONFIG, arg("--device", default=None, help="auto, cpu, cuda or cuda:N (default: train.device, auto)"),
          NO_PROGRESS),
    overrides={"device": "train.device"}, options=lambda a: {"model_dir": a.model_dir, "out": a.out})
