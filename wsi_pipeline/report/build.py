"""`wsi-pipeline report RUN`: RUN/report/index.html + assets/, one folder that opens from disk.

The folder is built beside its final name (RUN/report.tmp-<writer>) and swapped in with two
renames, so a reader sees the old report or the new one, never half of one. Plots are inline SVG
(matplotlib), images are small copies in report/assets/, so the folder can be zipped and sent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from .. import __version__
from ..io import remove_stale_temps, temp_path
from . import assets, collect, curves, plots
from .page import document, e, figure, fmt, metric_text, table

log = logging.getLogger("wsi_pipeline")
BAND_BOOTSTRAP = 200
VIEWER_URL = "http://127.0.0.1:8000/"


def build_report(run_dir: str | os.PathLike, manifest=None, *, viewer_url: str = VIEWER_URL) -> Path:
    """Write RUN/report/index.html (+ assets/, run.json); returns the index path.

    `manifest`: a loaded Manifest (slide paths, patients, labels of slides without predictions) or
    None (what the run folder says only). run.json records the manifest's path for the viewer.
    """
    run = Path(run_dir).resolve()
    if not run.is_dir():
        from ..errors import PipelineError

        raise PipelineError(f"run folder not found: {run}")
    final = run / "report"
    remove_stale_temps(run, outputs=[final.name])
    tmp = temp_path(final)
    tmp.mkdir()
    try:
        _write(run, tmp, manifest, viewer_url)
        _swap_in(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "index.html"


def _swap_in(tmp: Path, final: Path) -> None:
    old = None
    if final.is_dir() and not final.is_symlink():
        old = temp_path(final)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _manifest_rows(manifest) -> list[dict]:
    if manifest is None:
        return []
    return [{"slide_id": r.slide_id, "patient_id": r.patient_id, "label": r.label or "", "cohort": r.cohort,
             "path": str(r.path), "is_volume": bool(getattr(r, "is_volume", False))} for r in manifest]


def _write(run: Path, out: Path, manifest, viewer_url: str) -> None:
    rows = _manifest_rows(manifest)
    results = collect.cohort_results(run)
    fails = collect.failures(run)
    sections = [_overview(run, results, rows, fails, viewer_url)]
    for cohort in sorted({r.cohort for r in results}):
        sections.append(_cohort_section(cohort, [r for r in results if r.cohort == cohort]))
    sizes: dict[str, tuple[int, int] | None] = {}   # level-0 size of each thumbnail drawn here
    sections.append(_slides_section(run, out, rows, results, fails, viewer_url, sizes))
    sections.append(_detection_section(run))
    sections.append(_segment_section(run, out, sizes))
    sections.append(_volumes_section(run, out))
    sections.append(_failures_section(fails))
    sections.append(_configs_section(run, results))
    html = document(f"wsi-pipeline report: {run.name}", [s for s in sections if s],
                    subtitle=f"run folder {run} · wsi-pipeline {__version__}")
    (out / "index.html").write_text(html, encoding="utf-8")
    manifest_path = getattr(manifest, "path", None)
    (out / "run.json").write_text(json.dumps({
        "run": str(run), "wsi_pipeline": __version__,
        "manifest": str(Path(manifest_path).resolve()) if manifest_path else None,
        "cohorts": [{"model": r.model, "cohort": r.cohort} for r in results],
    }, indent=1), encoding="utf-8")


def _overview(run: Path, results, rows, fails, viewer_url: str) -> str:
    n_slides = len(collect.slide_ids(run, rows, results, fails))
    items = [f"<li>{n_slides} slide(s); {len(results)} model × cohort result(s); "
             f"{len(fails)} failure(s)</li>",
             f"<li>slide viewer: <code>wsi-pipeline view {e(run)}</code>, then "
             f"<a href=\"{e(viewer_url)}\">{e(viewer_url)}</a> (the slide links below open there)</li>"]
    return f"<section id=\"overview\"><ul>{''.join(items)}</ul></section>"


# -- classification ------------------------------------------------------------------------
def _binary_curves(res: collect.CohortResult, class_index: int):
    y, probs, groups = res.arrays()
    if len(y) == 0 or (y == class_index).all() or not (y == class_index).any():
        return None
    return curves.curves_with_bands(y == class_index, probs[:, class_index], groups,
                                    n_bootstrap=BAND_BOOTSTRAP, seed=0)


def _cohort_section(cohort: str, results: list) -> str:
    parts = [f'<section class="cohort" id="cohort-{e(cohort)}"><h2>cohort {e(cohort)}</h2>']
    header = ["model", "slides", "patients", "AUC [95% CI]", "balanced accuracy", "F1 macro", "folds",
              "training run"]
    body = []
    for res in results:
        pooled = res.metrics.get("pooled", {})
        body.append([res.model, pooled.get("n_slides"), pooled.get("n_patients"), metric_text(pooled.get("auc")),
                     metric_text(pooled.get("balanced_accuracy")), metric_text(pooled.get("f1_macro")),
                     res.metrics.get("n_folds"), res.metrics.get("training_run_id", "")])
    parts.append(table(header, body, cls="models-table"))
    auc_note = results[0].metrics.get("auc", "")
    ci_note = results[0].metrics.get("ci", "")
    parts.append(f'<p class="muted">AUC: {e(auc_note)}; CI: {e(ci_note)}. Out-of-fold predictions '
                 f"pooled over the folds.</p>")
    if len(results) > 1 and all(len(r.classes) == 2 for r in results):
        series = []
        for res in results:
            c = _binary_curves(res, 1)
            if c is not None:
                series.append((res.model, c["roc"], f"{res.model} ({metric_text(res.metrics['pooled'].get('auc'))})"))
        if series:
            parts.append('<h3>models side by side</h3><div class="plots">'
                         + figure(plots.curve_plot("roc", series), "ROC of each model, patient bootstrap bands")
                         + "</div>")
    parts.append('<div class="models">')
    for res in results:
        parts.append(_model_block(res))
    parts.append("</div></section>")
    return "".join(parts)


def _model_block(res: collect.CohortResult) -> str:
    y, probs, groups = res.arrays()
    pooled = res.metrics.get("pooled", {})
    out = [f'<div class="model" id="result-{e(res.model)}-{e(res.cohort)}"><h3>{e(res.model)} on '
           f"{e(res.cohort)}: AUC {e(metric_text(pooled.get('auc')))}</h3>"]
    figs = []
    targets = [len(res.classes) - 1] if len(res.classes) == 2 else list(range(len(res.classes)))
    roc_series, pr_series, prevalence = [], [], None
    for k in targets:
        c = _binary_curves(res, k)
        if c is None:
            continue
        label = res.classes[k] if len(targets) > 1 else f"P({res.classes[k]})"
        auc_value = curves.binary_auc_of(c["roc"])
        ap = curves.average_precision(y == k, probs[:, k])
        roc_series.append((label, c["roc"], f"{label} AUC {auc_value:.3f}"))
        pr_series.append((label, c["pr"], f"{label} AP {fmt(ap)}"))
        prevalence = float(np.mean(y == k)) if len(targets) == 1 else None
    if roc_series:
        n_used = roc_series[0][1].n_bootstrap
        figs.append(figure(plots.curve_plot("roc", roc_series),
                           f"band: 2.5-97.5% over {n_used} patient-level bootstrap resamples"))
        figs.append(figure(plots.curve_plot("pr", pr_series, prevalence=prevalence),
                           "dotted: prevalence" if prevalence is not None else ""))
    if len(y):
        pos = len(res.classes) - 1
        if len(res.classes) == 2:
            figs.append(figure(plots.calibration_plot(curves.calibration_bins(y == pos, probs[:, pos]),
                                                      res.classes[pos])))
        matrix = curves.confusion(y, probs.argmax(axis=1), len(res.classes))
        figs.append(figure(plots.confusion_plot(matrix, res.classes),
                           "decision: the most probable class" + (" (P > 0.5)" if len(res.classes) == 2 else "")))
    figs.append(figure(plots.loss_plot(res.folds), "per fold"))
    out.append('<div class="plots">' + "".join(figs) + "</div>")
    meta_by_fold = {m.get("fold"): m for m in res.folds}
    header = ["fold", "test slides", "AUC [95% CI]", "balanced accuracy", "F1 macro", "best epoch",
              "epochs run", "stopped early", "train/val/test slides"]
    body = []
    for f in res.metrics.get("folds", []):
        meta = meta_by_fold.get(f.get("fold"), {})
        sizes = "/".join(str(len(meta.get(k, []))) for k in ("train_slide_ids", "val_slide_ids", "test_slide_ids")) \
            if meta else "–"
        body.append([f.get("fold"), f.get("n_slides"), metric_text(f.get("auc")),
                     metric_text(f.get("balanced_accuracy")), metric_text(f.get("f1_macro")),
                     f.get("best_epoch"), meta.get("epochs_run", "–"), meta.get("stopped_early", "–"), sizes])
    out.append(table(header, body, cls="folds"))
    out.append("</div>")
    return "".join(out)


# -- slides ----------------------------------------------------------------------------------
def _slides_section(run: Path, out: Path, rows: list[dict], results, fails, viewer_url: str,
                    sizes: dict) -> str:
    ids = collect.slide_ids(run, rows, results, fails)
    if not ids:
        return ""
    by_manifest = {r["slide_id"]: r for r in rows}
    predictions = {}   # (model, cohort) -> {slide_id: row}
    for res in results:
        predictions[(res.model, res.cohort)] = {p["slide_id"]: p for p in res.predictions}
    failed = {}
    for f in fails:
        failed.setdefault(f.get("slide_id") or f.get("item_id", ""), []).append(f"{f.get('stage')}: {f.get('error')}")
    models = sorted({r.model for r in results})
    heat_models = collect.heatmap_models(run)
    header = ["slide", "patient", "cohort", "label", *[f"P ({m})" for m in models], "fold", "failed",
              "thumbnail", "heatmap", "top-k", "bottom-k", "viewer"]
    body, sort_values, classes, texts = [], [], [], []
    asset_dir = out / "assets"
    for sid in ids:
        m = by_manifest.get(sid, {})
        pred_rows = [(res, predictions[(res.model, res.cohort)].get(sid)) for res in results]
        pred_rows = [(res, p) for res, p in pred_rows if p]
        patient = m.get("patient_id") or next((p["patient_id"] for _, p in pred_rows), "")
        cohort = m.get("cohort") or next((p["cohort"] for _, p in pred_rows), "")
        label = m.get("label") or next((p["label"] for _, p in pred_rows), "")
        fold = next((p["fold"] for _, p in pred_rows), "")
        probs, prob_values = [], []
        for model in models:
            hit = next(((res, p) for res, p in pred_rows if res.model == model), None)
            if hit is None:
                probs.append("–")
                prob_values.append("")
                continue
            res, p = hit
            if len(res.classes) == 2:
                v = float(p[f"prob_{res.positive}"])
                probs.append(f"{v:.3f}")
                prob_values.append(f"{v:.6f}")
            else:
                best = max(res.classes, key=lambda c: float(p[f"prob_{c}"]))
                probs.append(f"{best} {float(p[f'prob_{best}']):.3f}")
                prob_values.append(f"{float(p[f'prob_{best}']):.6f}")
        slide_path = Path(m["path"]) if m.get("path") and not m.get("is_volume") else None
        thumb, level0_wh = assets.slide_thumbnail(slide_path, run / "tiles" / f"{sid}.qc.png",
                                                  asset_dir / f"{sid}.thumb.png")
        heat = topk_html = bottom_html = ""
        for model in heat_models:
            folder = run / "heatmaps" / model
            name = (assets.shrink_copy(folder / f"{sid}.png", asset_dir / f"{sid}.{model}.heatmap.png")
                    or assets.shrink_copy(folder / f"{sid}.montage.png", asset_dir / f"{sid}.{model}.montage.png"))
            if name:
                heat += f'<img class="thumb" src="assets/{e(name)}" alt="{e(model)} heatmap of {e(sid)}" ' \
                        f'title="{e(model)}">'
            patches = assets.topk_patches(folder / f"{sid}_topk", asset_dir, f"{sid}.{model}")
            topk_html += "".join(f'<img class="patch" src="assets/{e(p["file"])}" title="{e(model)} top '
                                 f'{e(p["rank"])}: {e(p["score"])}">' for p in patches["top"])
            bottom_html += "".join(f'<img class="patch" src="assets/{e(p["file"])}" title="{e(model)} bottom '
                                   f'{e(p["rank"])}: {e(p["score"])}">' for p in patches["bottom"])
        thumb_html = f'<img class="thumb" src="assets/{e(thumb)}" alt="thumbnail of {e(sid)}">' if thumb else ""
        link = f'<a href="{e(viewer_url)}#slide={e(sid)}">view</a>'
        fail_text = "; ".join(failed.get(sid, []))
        body.append([sid, patient, cohort, label, *probs, fold, fail_text or "no", thumb_html, heat,
                     topk_html, bottom_html, link])
        sort_values.append([sid, patient, cohort, label, *prob_values, fold, "1" if fail_text else "0",
                            "", "", "", "", ""])
        classes.append("failed" if fail_text else "")
        texts.append(" ".join(str(v) for v in [sid, patient, cohort, label, *probs, fold, fail_text or "no"]))
        sizes[sid] = level0_wh
    n_img = len(header)
    raw = frozenset(range(n_img - 5, n_img))
    html = table(header, body, cls="sortable slides", table_id="slides", raw_columns=raw,
                 sort_values=sort_values, row_classes=classes, row_text=texts)
    return ('<section id="slide-table"><h2>slides</h2><p class="muted">Out-of-fold probability of the positive '
            "class (the fold where the slide was a test slide); click a column to sort.</p>"
            '<p><input class="filter" data-table="slides" placeholder="filter slides" size="30"></p>'
            f"{html}</section>")


# -- detection, segmentation -----------------------------------------------------------------
def _detection_section(run: Path) -> str:
    summaries = collect.detection_summaries(run)
    if not summaries:
        return ""
    parts = ['<section id="detection"><h2>detection</h2>']
    for model, rows in summaries.items():
        classes = sorted({c for r in rows for c in (r.get("counts") or {})})
        header = ["slide", *[f"n {c}" for c in classes], "tissue mm²", "mitotic density /mm²",
                  "hotspot count", "hotspot x, y (µm)", "per HPF"]
        body = []
        for r in rows:
            h = r.get("hotspot") or {}
            body.append([r.get("slide_id"), *[(r.get("counts") or {}).get(c, 0) for c in classes],
                         fmt(r.get("tissue_area_mm2")), fmt(r.get("mitotic_density_per_mm2")), h.get("count"),
                         f"{fmt(h.get('x_um'), 1)}, {fmt(h.get('y_um'), 1)}", fmt(h.get("per_hpf"), 2)])
        parts.append(f"<h3>{e(model)}</h3>" + table(header, body, cls="sortable detection",
                                                     table_id=f"detection-{model}"))
    parts.append("</section>")
    return "".join(parts)


def _segment_section(run: Path, out: Path, sizes: dict) -> str:
    metrics = collect.segment_rows(run)
    masks = sorted(p for p in (run / "segment").glob("*.geojson")) if (run / "segment").is_dir() else []
    if not metrics and not masks:
        return ""
    parts = ['<section id="segmentation"><h2>weak segmentation</h2>']
    if metrics:
        header = list(metrics[0].keys())
        parts.append(table(header, [[r.get(h) for h in header] for r in metrics], cls="sortable segment",
                           table_id="segment-metrics"))
    figs = []
    for geo in masks:
        sid = geo.name[: -len(".geojson")]
        thumb = out / "assets" / f"{sid}.thumb.png"
        if not thumb.is_file():
            continue
        name = assets.mask_overlay(thumb, geo, sizes.get(sid), out / "assets" / f"{sid}.mask.png")
        if name:
            figs.append(f'<figure><img class="thumb" src="assets/{e(name)}" alt="lesion mask of {e(sid)}">'
                        f'<figcaption class="muted">{e(sid)}</figcaption></figure>')
    if figs:
        parts.append('<h3>lesion masks</h3><div class="plots">' + "".join(figs) + "</div>")
    parts.append("</section>")
    return "".join(parts)


def _volumes_section(run: Path, out: Path) -> str:
    """CT/MRI rows: each volume's montage (slices through the heatmap peak), prediction, whether the
    peak lies in the lesion and the CAM mask's Dice (heatmap done files); CV numbers are in the
    cohort sections above."""
    header = ["volume", "model", "prediction", "peak in lesion", "CAM Dice", "montage"]
    body = []
    for model in collect.heatmap_models(run):
        for montage in sorted((run / "heatmaps" / model).glob("*.montage.png")):
            vid = montage.name[: -len(".montage.png")]
            done = collect.read_json(run / "heatmaps" / model / f"{vid}.done.json") or {}
            pred = done.get("prediction") or {}
            probs = dict(zip(pred.get("classes") or [], pred.get("probs") or []))
            name = assets.shrink_copy(montage, out / "assets" / f"{vid}.{model}.montage-large.png", 640)
            img = f'<img src="assets/{e(name)}" alt="montage of {e(vid)}" style="max-width:640px">' if name else ""
            body.append([vid, model, ", ".join(f"{k} {v:.3f}" for k, v in probs.items()),
                         fmt(done.get("peak_in_lesion")), fmt(done.get("dice")), img])
    if not body:
        return ""
    return ('<section id="volumes"><h2>volumes</h2>'
            + table(header, body, cls="volumes", raw_columns=frozenset({5})) + "</section>")


def _failures_section(fails: list[dict]) -> str:
    if not fails:
        return '<section id="failures"><h2>failures</h2><p>none (failures.csv is empty or absent)</p></section>'
    header = list(fails[0].keys())
    body = [[f.get(h) for h in header] for f in fails]
    return (f'<section id="failures"><h2>failures ({len(fails)})</h2>'
            + table(header, body, cls="sortable failures", table_id="failures-table") + "</section>")


def _configs_section(run: Path, results) -> str:
    configs = collect.resolved_configs(run)
    parts = ['<section id="configs"><h2>configuration and versions</h2>',
             f"<p>wsi-pipeline {e(__version__)}</p>"]
    versions = {}
    for res in results:
        for meta in res.folds:
            if isinstance(meta.get("versions"), dict):
                versions = meta["versions"]
                break
    if versions:
        parts.append("<p>trained with: " + ", ".join(f"{e(k)} {e(v)}" for k, v in sorted(versions.items())) + "</p>")
    for name, text in configs.items():
        parts.append(f"<details><summary>{e(name)}</summary><pre>{e(text)}</pre></details>")
    parts.append("</section>")
    return "".join(parts)
