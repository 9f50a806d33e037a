"""What the tile, extract and heatmap stages do with a volume row (`record.is_volume`).

A volume is one more kind of source: the stages (stages/tile.py, wsi_pipeline/features/extractor.py,
wsi_pipeline/exports/heatmaps.py) dispatch here per row, so the workflow's rules, run folder, failure
records and reruns are the slides' own:

    tile_volume       RUN/tiles/{id}.coords.h5: body mask + 2.5-D instances, coords (N, 3) with the
                      grid's spacing/affine and the file's own grid, the `volumes` config hash and
                      the scan's identity (a replaced scan is tiled again)
    extract_volume    RUN/features/{encoder}/{id}.h5, the slides' layout (coord_dims 3); trusted on
                      rerun by the Extractor's own config hash (encoder, weights, tiling hash, scan)
    heatmap_volume    RUN/heatmaps/{model}/{id}.heatmap.nii.gz (the scan's grid and affine),
                      .montage.png, .cam_mask.nii.gz, then {id}.done.json with the prediction, the
                      peak and, where the row has a truth_mask, peak-in-lesion and Dice

The heatmap uses the fold model that held the volume out when the cohort's folds were trained on
this manifest (an honest localisation figure), else the whole fold ensemble (--model-dir).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import h5py
import numpy as np

from ..features.features_h5 import features_h5_is_valid, write_features_h5
from ..io import remove_stale_temps, write_json_atomic
from ..run.folder import RunFolder
from ..slides.identity import SlideIdentity, file_fingerprint
from ..tiling.coords_h5 import coords_h5_is_valid, read_coords_h5, read_slide_identity, write_instance_coords_h5
from .volume import VolumeError

log = logging.getLogger("wsi_pipeline")
DONE_FORMAT_VERSION = 1
OUTPUT_SUFFIXES = {"heatmap": ".heatmap.nii.gz", "montage": ".montage.png", "cam_mask": ".cam_mask.nii.gz"}


def volume_identity(path: str | Path) -> SlideIdentity:
    """The scan's identity in the slides' format (slides/identity.py): a NIfTI file's size and
    fingerprint; a DICOM series folder's total size and a fingerprint over its files' names, sizes
    and fingerprints (a slice added, removed or replaced changes it). No level dimensions."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        digest, total, mtime = hashlib.sha256(b"dicom-series\n"), 0, 0
        for f in files:
            stat = f.stat()
            total += stat.st_size
            mtime = max(mtime, stat.st_mtime_ns)
            digest.update(f"{f.relative_to(path).as_posix()}\n{file_fingerprint(f, stat.st_size)}\n".encode())
        return SlideIdentity(total, mtime, f"series:{digest.hexdigest()}", ())
    stat = path.stat()
    return SlideIdentity(stat.st_size, stat.st_mtime_ns, file_fingerprint(path, stat.st_size), ())


def tile_config_hash(cfg) -> str:
    """What a volume's coords.h5 depends on: the `volumes` instance settings."""
    return f"volumes-{cfg.volumes.instance_params().config_hash()}"


def _existing_scan(record) -> None:
    if not record.path.exists():
        raise VolumeError(record.slide_id, f"file not found: {record.path}")


def tile_volume(record, cfg, run: RunFolder, *, force: bool = False) -> str:
    """coords.h5 of one volume row; "skipped" when a valid one for these settings and this scan exists."""
    from .instances import volume_instances
    from .readers import open_volume

    _existing_scan(record)
    out = run.coords_h5(record.slide_id)
    config_hash = tile_config_hash(cfg)
    identity = volume_identity(record.path)
    if not force and coords_h5_is_valid(out, config_hash, slide=identity):
        return "skipped"
    recorded = read_slide_identity(out) if coords_h5_is_valid(out, config_hash) else None
    if recorded is not None and not identity.matches(recorded):
        # The old coords.h5 must not stay behind as this volume's completion marker if tiling fails.
        log.warning("volume %r: re-tiling: the scan changed since it was tiled (%s)", record.slide_id,
                    identity.difference(recorded) or "content fingerprint differs")
        out.unlink(missing_ok=True)
    volume = open_volume(record.path, volume_id=record.slide_id, modality=record.modality, frame=record.frame)
    instances = volume_instances(volume, cfg.volumes.instance_params())
    run.tiles_dir.mkdir(parents=True, exist_ok=True)
    write_instance_coords_h5(out, instances.coords, instances.body_fraction,
                             {**instances.attrs(), "config_hash": config_hash, **identity.to_attrs()},
                             {"scale": instances.scale})
    return "done"


def _encoder_device(encoder):
    buffer = next(iter(encoder.buffers()), None)
    return buffer.device if buffer is not None else "cpu"


def extract_volume(extractor, record, *, force: bool = False) -> str:
    """features.h5 of one volume row from its coords.h5 (`extractor`: the extract stage's
    `Extractor`, whose encoder, config hash and validity rules apply unchanged)."""
    from .instances import VolumeInstances, encode_instances, prepare
    from .readers import open_volume

    run, cfg = extractor.run, extractor.cfg
    coords_path = run.coords_h5(record.slide_id)
    if not coords_h5_is_valid(coords_path):
        raise VolumeError(record.slide_id, f"no complete coords.h5 at {coords_path}: run the tile stage first")
    coords, cattrs = read_coords_h5(coords_path)
    if int(cattrs["coord_dims"]) != 3:
        raise VolumeError(record.slide_id, f"{coords_path} holds slide coordinates (k = {cattrs['coord_dims']}), "
                                           f"not a volume's: re-run the tile stage")
    _existing_scan(record)
    tiled_from = SlideIdentity.from_attrs(cattrs)
    current = volume_identity(record.path)
    if tiled_from is None or not current.matches(tiled_from):
        raise VolumeError(record.slide_id, f"{record.path} is not the scan {coords_path} was made from: "
                                           f"re-run the tile stage")
    params = cfg.volumes.instance_params()
    if str(cattrs["config_hash"]) != tile_config_hash(cfg):
        raise VolumeError(record.slide_id, f"{coords_path} was tiled with other `volumes` settings: "
                                           f"re-run the tile stage")
    e = cfg.extract
    out = run.features_h5(e.encoder, record.slide_id)
    config_hash = extractor.config_hash(str(cattrs["config_hash"]), tiled_from.fingerprint)
    if not force and features_h5_is_valid(out, config_hash, coords):
        return "skipped"
    volume = open_volume(record.path, volume_id=record.slide_id, modality=record.modality, frame=record.frame)
    grid, channels, body = prepare(volume, params)
    if grid.shape != tuple(int(v) for v in cattrs["grid_shape"]) or not np.allclose(grid.affine, cattrs["affine"]):
        raise VolumeError(record.slide_id, f"the resampled grid differs from {coords_path}: re-run the tile stage")
    with h5py.File(coords_path, "r") as f:
        body_fraction = f["tissue_fraction"][()]
        scale = f["scale"][()] if "scale" in f else None
    instances = VolumeInstances(grid, coords, body_fraction, channels, body, params, scale)
    encoder = extractor.encoder
    batch = e.batch_size or 256
    features = encode_instances(instances, encoder, batch_size=batch, device=_encoder_device(encoder))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_features_h5(out, features, coords, {
        **instances.attrs(), **current.to_attrs(), "encoder": e.encoder, "encoder_version": extractor.encoder_version,
        "weights_source": encoder.weights_source, "weights_sha256": encoder.weights_sha256,
        "out_dim": int(encoder.out_dim), "config_hash": config_hash}, dtype=e.features_dtype)
    return "done"


def output_paths(out_dir: Path, volume_id: str) -> dict[str, Path]:
    return {key: out_dir / f"{volume_id}{suffix}" for key, suffix in OUTPUT_SUFFIXES.items()}


def held_out_fold(model_dir: Path, volume_id: str) -> Path | None:
    """The fold folder whose test split held `volume_id` out, if any."""
    from ..training.checkpoints import fold_dirs, read_fold_meta

    for d in fold_dirs(model_dir):
        if volume_id in read_fold_meta(d).get("test_slide_ids", []):
            return d
    return None


def _file_identity(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    stat = path.stat()
    return {"path": str(path), "size_bytes": stat.st_size, "fingerprint": file_fingerprint(path, stat.st_size)}


def heatmap_volume(runner, record, *, force: bool = False) -> str:
    """Heatmap NIfTI, montage and CAM mask of one volume row (`runner`: the heatmap stage's
    `HeatmapRunner`: its run folder, model folders, checkpoint hashes and done-file path)."""
    from ..training.checkpoints import load_fold_model
    from .pipeline import explain_volume

    run, cfg = runner.run, runner.cfg
    volume_id = run.name(record.slide_id, "slide_id")
    model_dir = runner.model_dir_for(record)
    encoder = runner.encoder_for(model_dir)  # the model's (checked by runner.check_inputs)
    features_path = run.features_h5(encoder, volume_id)
    if not features_path.is_file():
        raise VolumeError(volume_id, f"no features at {features_path}: run the extract stage first")
    if not model_dir.is_dir():
        raise VolumeError(volume_id, f"no trained model at {model_dir}: run the train stage first (or pass --model-dir)")
    if not runner.hashes(model_dir):
        raise VolumeError(volume_id, f"no fold checkpoints (fold_*/) in {model_dir}")
    if record.truth_mask is not None and not record.truth_mask.is_file():
        raise VolumeError(volume_id, f"truth_mask not found: {record.truth_mask}")
    identity = {**runner.identity(record, features_path, model_dir),
                "heatmap_config_hash": cfg.section_hash("volumes"), "truth_mask": _file_identity(record.truth_mask)}
    done = runner.done_path(volume_id)
    outputs = output_paths(runner.out_dir, volume_id)
    if not force and done.is_file() and all(p.is_file() for p in outputs.values()):
        try:
            if json.loads(done.read_text(encoding="utf-8")).get("identity") == identity:
                return "skipped"
        except (OSError, json.JSONDecodeError):
            pass
    done.unlink(missing_ok=True)
    # What a killed job left for this volume only (other volumes' jobs write in the same folder).
    remove_stale_temps(runner.out_dir, [*outputs.values(), done])

    fold = held_out_fold(model_dir, volume_id)
    if fold is not None:
        from ..devices import resolve_device

        models = [load_fold_model(fold, device=resolve_device(cfg.train.device, "train.device"))]
    else:
        models = runner.ensembles.models(model_dir)
    v = cfg.volumes
    try:
        e = explain_volume(record, run, models, runner.model_name, encoder, v.instance_params(),
                           record.truth_mask, cam_threshold=v.cam_threshold, smooth=v.smooth)
    except ValueError as exc:  # grid mismatch, non-finite scores: this volume's problem
        raise VolumeError(volume_id, str(exc)) from None
    write_json_atomic(done, {
        "identity": identity,
        "kind": "volume",
        "outputs": {k: p.name for k, p in outputs.items()},
        "model_fold": fold.name if fold is not None else "ensemble",
        "prediction": {"classes": list(e.probs), "probs": list(e.probs.values())},
        "peak_source_vox": list(e.peak_source_vox),
        "peak_in_lesion": e.peak_in_lesion,
        "dice": e.dice,
        "label": record.label,
    })
    return "done"
