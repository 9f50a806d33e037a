"""One slide's features: coords.h5 → patches → encoder → RUN/features/{encoder}/{slide_id}.h5.

`Extractor(cfg, run)(record)` does one slide (the extract stage, stages/extract.py, runs it over a
manifest; torch loads in `wsi_pipeline.features.patches`, only when some slide needs the encoder).

The encoder is built once per batch and only if some slide needs it, so a rerun over a finished
run loads no model. A features.h5 is trusted when it is complete, its coords equal the current
coords.h5, and its config hash (encoder, weights sha256, precision, dtype, tiling, and the content
fingerprint of the slide file coords.h5 was tiled from) matches. Before that, the slide file must
still be the one coords.h5 was made from (slides/identity.py): a slide replaced since tiling is an
error naming the fix (re-run the tile stage), never "already complete".

features.h5 records how the patches were read: attrs patch_reader ("direct": tiles decoded by
slides/tile_reader.py; else the region reader, "openslide" or "tiffslide") and patch_reader_note
(why). Files from before them were read by the region reader. The reader is not in the config
hash: both give the same pixels. It also records the autocast used (precision; precision_requested:
the config's, `auto` being the encoder's recommendation on GPU, fp32 on CPU) and the resize from the
patch to the encoder's input (resize_px, resize_interpolation, resize_antialias, crop_px; 0 / "none":
fed as tiled). A tiling far from the encoder's recommended µm/px or tile side is warned about once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import PipelineError, SlideError
from ..run.config import Config
from ..run.folder import RunFolder
from ..run.manifest import SlideRecord
from ..slides import open_slide
from ..slides.identity import SlideIdentity, slide_identity
from ..tiling.coords_h5 import coords_h5_is_valid, magnification_attrs, read_coords_h5
from .features_h5 import features_h5_is_valid, write_features_h5

log = logging.getLogger("wsi_pipeline")


def weights_identity(checkpoint: str | None, encoder: str | None = None) -> str:
    """What identifies the weights without loading them: file sha256, hub id, "random", or "none"
    for parameter-free encoders."""
    if encoder is not None:
        from ..encoders import get_spec, list_encoders

        if encoder in list_encoders() and get_spec(encoder).parameter_free:
            if checkpoint not in (None, "none"):
                raise PipelineError(f"extract.checkpoint: encoder {encoder!r} has no weights; set it to "
                                    f"none (got {checkpoint!r})")
            return "none"
    if checkpoint is None:
        raise PipelineError("extract.checkpoint is not set: give a weights file, an 'hf-hub:' id, "
                            "or 'random' to extract with random weights on purpose")
    if checkpoint == "random" or checkpoint.startswith("hf-hub:"):
        return checkpoint
    path = Path(checkpoint)
    if not path.exists():
        raise PipelineError(f"extract.checkpoint: file not found: {path}")
    from ..encoders.weights import checkpoint_sha256

    # A file, or a model-hub snapshot folder (hashed as create_encoder records it in features.h5).
    try:
        return checkpoint_sha256(path)
    except PipelineError as exc:
        raise PipelineError(f"extract.checkpoint: {exc}") from None


def _encoder_version(name: str) -> int:
    """The registered spec's output version (1 for timm architectures and unknown names)."""
    from ..encoders import get_spec, list_encoders

    return get_spec(name).version if name in list_encoders() else 1


class Extractor:
    """Holds the (lazily built) encoder and the settings for one batch."""

    def __init__(self, cfg: Config, run: RunFolder, progress: bool = True):
        self.cfg = cfg
        self.run = run
        self.progress = progress
        self.weights_id = weights_identity(cfg.extract.checkpoint, cfg.extract.encoder)
        self.encoder_version = _encoder_version(cfg.extract.encoder)
        self._encoder = None
        from ..devices import resolve_device
        from ..encoders.fit import LEGACY_AUTO, effective_precision

        device_type = resolve_device(cfg.extract.device, "extract.device").type
        # The autocast patches are encoded at (extract.precision, `auto` resolved for the encoder).
        self.precision = effective_precision(cfg.extract.precision, cfg.extract.encoder, device_type)
        # `auto` hashes as before where it still means what it meant (bf16 on GPU, fp32 on CPU), so
        # existing features stay valid; where the encoder's recommendation differs, features redo.
        self._precision_changed = (cfg.extract.precision == "auto"
                                   and self.precision != LEGACY_AUTO.get(device_type, "fp32"))
        self.fit_warnings: list[str] = []   # tiling far from the encoder's, once per distinct tiling

    @property
    def encoder(self):
        if self._encoder is None:
            from ..devices import resolve_device
            from ..encoders import create_encoder

            e = self.cfg.extract
            self._encoder = create_encoder(e.encoder, e.checkpoint, device=resolve_device(e.device, "extract.device"))
        return self._encoder

    def config_hash(self, tiling_hash: str, slide_fingerprint: str | None = None) -> str:
        e = self.cfg.extract
        payload = [e.encoder, self.weights_id, e.precision, e.features_dtype, tiling_hash]
        if slide_fingerprint is not None:  # None: coords.h5 from before identities, hashed as then
            # New pixels mean new features even where the grid came out the same; the train stage
            # folds this hash into its checkpoints' hashes, so they are retrained too.
            payload.append(slide_fingerprint)
        if self.encoder_version > 1:  # version 1 hashes as before, so existing features stay valid
            payload.append(f"encoder_version={self.encoder_version}")
        if self._precision_changed:
            payload.append(f"precision={self.precision}")
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]

    def __call__(self, record: SlideRecord, force: bool = False) -> str:
        if record.is_volume:  # 2.5-D instances of a CT/MR scan, same encoder and features.h5 layout
            from ..volumes.stages import extract_volume

            return extract_volume(self, record, force=force)
        e = self.cfg.extract
        coords_path = self.run.coords_h5(record.slide_id)
        if not coords_h5_is_valid(coords_path):
            raise SlideError(record.slide_id, f"no complete coords.h5 at {coords_path}: run the tile stage first")
        coords, cattrs = read_coords_h5(coords_path)
        out = self.run.features_h5(e.encoder, record.slide_id)
        tiled_from = SlideIdentity.from_attrs(cattrs)
        config_hash = self.config_hash(str(cattrs["config_hash"]),
                                       tiled_from.fingerprint if tiled_from is not None else None)
        opened = _check_slide_matches_coords(record, self.cfg.slides.backend, cattrs)
        self._warn_tiling_fit(cattrs)
        if not force and features_h5_is_valid(out, config_hash, coords):
            return "skipped"
        from .patches import PatchSource, extract_features, plan_reader

        encoder = self.encoder
        source = PatchSource(
            slide_path=str(record.path), slide_id=record.slide_id, backend=self.cfg.slides.backend,
            mpp_override=record.mpp, coords=coords, patch_level=int(cattrs["patch_level"]),
            # Patches go in at their own size (patch_size px at target_mpp): resizing to an encoder's
            # nominal input would change the physical resolution. CNNs and timm ViTs with
            # dynamic_img_size take any size; choose patch_size_px to match the encoder's training.
            read_size_px=int(cattrs["read_size_px"]), out_size_px=int(cattrs["patch_size"]))
        # Not in the config hash: both readers give the same pixels, so features stay valid.
        source, reader, reader_note = plan_reader(source, *opened, requested=e.reader)
        log.info("extract %s: patch reader %s (%s)", record.slide_id, reader, reader_note)
        with tqdm(total=len(coords), desc=record.slide_id, unit="patch", leave=False,
                  disable=not self.progress, dynamic_ncols=True) as bar:
            features = extract_features(encoder, source, batch_size=e.batch_size,
                                        num_workers=e.num_workers, precision=self.precision,
                                        on_batch=bar.update)
        if not np.isfinite(features).all():
            bad = int((~np.isfinite(features).all(axis=1)).sum())
            raise SlideError(record.slide_id, f"encoder produced non-finite features for {bad} patches "
                                              f"(try precision: fp32)")
        if cattrs.get("coord_dims", 2) == 2 and "slide_mpp" in cattrs and "target_mpp" in cattrs:
            # A coords.h5 from before magnifications were recorded: TRIDENT needs them all the same.
            cattrs = {**magnification_attrs(cattrs["slide_mpp"], cattrs["target_mpp"]), **cattrs}
        attrs = {
            "encoder": e.encoder,
            "weights_source": str(e.checkpoint),
            "weights_sha256": encoder.weights_sha256,
            "random_weights": encoder.weights_sha256 == "random",
            "encoder_version": self.encoder_version,
            "out_dim": encoder.out_dim,
            "input_size_px": int(cattrs["patch_size"]),
            "encoder_native_input_px": encoder.input_size_px,
            "mean": np.asarray(encoder.spec.mean, dtype=np.float64),
            "std": np.asarray(encoder.spec.std, dtype=np.float64),
            "precision": self.precision,            # the autocast used (fp32, bf16, fp16)
            "precision_requested": e.precision,     # the config's (auto: resolved as above)
            # The encoder's input as its authors made it from the patch (encoders.registry.resize_and_crop).
            "resize_px": encoder.spec.resize_px if encoder.spec.resize_px is not None else 0,
            "resize_interpolation": encoder.spec.interpolation if encoder.spec.resize_px is not None else "none",
            "resize_antialias": bool(encoder.spec.antialias and encoder.spec.resize_px is not None),
            "crop_px": encoder.spec.crop_px if encoder.spec.crop_px is not None else 0,
            "patch_reader": reader,
            "patch_reader_note": reader_note,
            "config_hash": config_hash,
            "slide_id": record.slide_id,
            "versions": json.dumps(_versions()),
        }
        for key, value in cattrs.items():
            attrs[key if key not in attrs else f"coords_{key}"] = value
        attrs["tiling_config_hash"] = cattrs["config_hash"]
        attrs["config_hash"] = config_hash
        write_features_h5(out, features, coords, attrs, dtype=e.features_dtype, coords_attrs=cattrs)
        return "done"

    def _warn_tiling_fit(self, cattrs) -> None:
        """Warn once per distinct tiling (not per slide) that is far from the encoder's recommendation."""
        if "target_mpp" not in cattrs or cattrs.get("coord_dims", 2) != 2:
            return
        from ..encoders.fit import tiling_fit_warning

        warning = tiling_fit_warning(self.cfg.extract.encoder, float(cattrs["target_mpp"]), int(cattrs["patch_size"]))
        if warning is not None and warning not in self.fit_warnings:
            self.fit_warnings.append(warning)
            log.warning("%s", warning)


def _versions() -> dict:
    import h5py
    import timm
    import torch

    from .. import __version__

    return {"wsi_pipeline": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__, "python": platform.python_version()}


def _check_slide_matches_coords(record: SlideRecord, backend: str, cattrs) -> tuple:
    """The slide must still be the one tiled: a file replaced or truncated since then would otherwise
    fail inside a reader process, read the wrong pixels, or leave features of the old file standing
    as "already complete". Coords from before identities were recorded get the geometry check only.
    Returns (level_dimensions, level_downsamples, backend name, vendor) of the slide as opened."""
    with open_slide(record.path, slide_id=record.slide_id, backend=backend, mpp_override=record.mpp) as slide:
        tiled = (int(cattrs["level0_width"]), int(cattrs["level0_height"]))
        level = int(cattrs["patch_level"])
        if tuple(slide.dimensions) != tiled or level >= slide.level_count:
            raise SlideError(record.slide_id, f"the slide no longer matches its coords.h5 (tiled at "
                                              f"{tiled[0]}×{tiled[1]} px, level {level}; now "
                                              f"{slide.dimensions[0]}×{slide.dimensions[1]} px, "
                                              f"{slide.level_count} levels): re-run the tile stage")
        tiled_from = SlideIdentity.from_attrs(cattrs)
        if tiled_from is not None:
            now = slide_identity(record.path, slide.level_dimensions)
            if not now.matches(tiled_from):
                raise SlideError(record.slide_id, f"the slide no longer matches its coords.h5 (the file "
                                                  f"changed since it was tiled: {now.difference(tiled_from)})"
                                                  f": re-run the tile stage")
        return slide.level_dimensions, slide.level_downsamples, slide.backend_name, slide.vendor
