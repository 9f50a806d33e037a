"""What an artefact was made from, and the one comparison every consumer makes before using it.

Features (features.h5 root attrs, written by extract) say how they were made; `features_provenance`
reads that as one dict:
  encoder, encoder_version, weights_sha256   the network ("random" / "none" / an "hf-hub:" id where
                                             there is no weights file)
  target_mpp, patch_size_px                  slides: µm/px of the patches and their size in px
  target_spacing_mm, instance_config_hash    volumes: resampled spacing (-1: native) and the 2.5-D
                                             instance settings (patch_size_px is then in voxels)
  coord_dims, modality                       2 and "slide" for whole-slide images; 3 and "CT"/"MR"
The train stage records the provenance its cohort's features share in every fold's config.json as
`training_features` (a cohort whose features were made differently is refused before training).

Consumers (predict, heatmap, segment) locate and check a slide's features through `locate_features`
/ `check_features`:
  - features made otherwise than the model's training features (any field above) are refused with
    one line naming both sides and the fix: `ProvenanceError`, exit 2, before any output is written;
  - a slide whose features are absent while the run holds another encoder's features for it gets
    the same kind of line (the encoder mismatch), not "run the extract stage first";
  - features whose recorded source identity (size and fingerprint of the slide file, copied from
    coords.h5; slides/identity.py) is not the manifest's file's are refused as well: this is what
    stops `predict --run TRAINING_RUN` on a new manifest whose slide ids collide with the training
    slides' from scoring the training slides' features.
Detection records the same source identity and its checkpoint hash in done.json; `checkpoint_mismatch`
is eval-detect's check that candidates come from the current detector.

Old files, decided here once: a field that a file (or a fold trained before `training_features`
existed, which records only its encoder) does not record is not compared; files are checked on
what they have. Features without a recorded source identity are not identity-checked (heatmap
still compares the slide's level-0 size). Features from before `encoder_version` are version 1, as
the extractor's config hash treats them. The mtime is recorded but never compared (slides/identity.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, Mapping

from ..errors import PipelineError, SlideError

FIELDS = ("encoder", "encoder_version", "weights_sha256", "target_mpp", "patch_size_px",
          "target_spacing_mm", "instance_config_hash", "coord_dims", "modality")
_LABELS = {"encoder": "encoder", "encoder_version": "encoder version", "weights_sha256": "weights",
           "target_mpp": "µm/px", "patch_size_px": "patch size", "target_spacing_mm": "voxel spacing",
           "instance_config_hash": "volume instance settings", "coord_dims": "coordinate dimensions",
           "modality": "modality"}
SLIDE_MODALITY = "slide"
MAX_LISTED = 10  # mismatching slides listed in one error; the rest are counted


class ProvenanceError(PipelineError):
    """Inputs made from something other than what the consumer needs: the user must fix them (exit 2)."""

    def __init__(self, slide_id: str | None, message: str):
        self.slide_id, self.message = slide_id, message
        super().__init__(message)


# -- what features were made from ------------------------------------------------------------------
def features_provenance(attrs: Mapping) -> dict:
    """{field: value or None} of a features.h5's root attrs (None: not recorded by this file)."""
    coord_dims = int(attrs.get("coord_dims", 2))
    volume = coord_dims == 3
    spacing = attrs.get("target_spacing_mm") if volume else None
    return {
        "encoder": _str(attrs.get("encoder")),
        "encoder_version": int(attrs.get("encoder_version", 1)) if attrs.get("encoder") is not None else None,
        "weights_sha256": _str(attrs.get("weights_sha256")),
        "target_mpp": None if volume or attrs.get("target_mpp") is None else float(attrs["target_mpp"]),
        "patch_size_px": None if attrs.get("patch_size") is None else int(attrs["patch_size"]),
        "target_spacing_mm": None if spacing is None else float(spacing),
        "instance_config_hash": _str(attrs.get("instance_config_hash")) if volume else None,
        "coord_dims": coord_dims,
        "modality": _str(attrs.get("modality")) if volume else SLIDE_MODALITY,
    }


def model_training_features(meta: Mapping, default_encoder: str | None = None) -> dict:
    """What a fold's model was trained on (its config.json); folds trained before `training_features`
    was recorded name only their encoder, and folds naming none take `default_encoder`
    (extract.encoder, as the consumers always did)."""
    recorded = meta.get("training_features")
    recorded = {k: recorded.get(k) for k in FIELDS} if isinstance(recorded, Mapping) else {k: None for k in FIELDS}
    return {**recorded, "encoder": recorded["encoder"] or _str(meta.get("encoder")) or default_encoder}


def differing_fields(a: Mapping, b: Mapping) -> list[str]:
    """Fields both record with different values (µm/px and spacing compared to 0.1 %)."""
    out = []
    for key in FIELDS:
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            continue
        same = math.isclose(float(x), float(y), rel_tol=1e-3) if key in ("target_mpp", "target_spacing_mm") else x == y
        if not same:
            out.append(key)
    return out


def merge_provenance(items: Mapping[str, Mapping]) -> tuple[dict, str | None]:
    """(the provenance a set of features shares, None) or ({}, one line naming the groups) when
    some of them were made differently. `items`: {slide_id: features_provenance}."""
    groups: list[tuple[dict, list[str]]] = []
    for sid, prov in items.items():
        for common, ids in groups:
            if not differing_fields(common, prov):
                ids.append(sid)
                for k in FIELDS:  # fill what this group's first file did not record
                    if common.get(k) is None:
                        common[k] = prov.get(k)
                break
        else:
            groups.append(({k: prov.get(k) for k in FIELDS}, [sid]))
    if len(groups) <= 1:
        return (groups[0][0] if groups else {}), None
    parts = [f"{describe(p)}: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}" for p, ids in groups]
    return {}, ("features made differently (re-extract them with one config): " + "; ".join(parts))


def describe(p: Mapping) -> str:
    """'encoder resnet18 (weights 3f2a9c01d4e5…) at 0.5 µm/px, 224 px, 2-D slide features'."""
    words = f"encoder {p.get('encoder') or '(unrecorded)'}"
    if p.get("encoder_version") not in (None, 1):
        words += f" v{p['encoder_version']}"
    if p.get("weights_sha256"):
        words += f" (weights {_short(p['weights_sha256'])})"
    if p.get("target_mpp") is not None:
        words += f" at {_num(p['target_mpp'])} µm/px"
    if p.get("patch_size_px") is not None:
        words += f", {p['patch_size_px']} {'vox' if p.get('coord_dims') == 3 else 'px'}"
    if p.get("target_spacing_mm") is not None:
        spacing = p["target_spacing_mm"]
        words += ", native spacing" if spacing < 0 else f", {_num(spacing)} mm spacing"
    if p.get("instance_config_hash"):
        words += f", instances {p['instance_config_hash']}"
    if p.get("coord_dims") is not None:
        kind = "slide" if p.get("modality") in (None, SLIDE_MODALITY) and p["coord_dims"] == 2 else \
            f"{p.get('modality') or ''} volume".strip()
        words += f", {p['coord_dims']}-D {kind} features"
    return words


def features_mismatch(training: Mapping, attrs: Mapping, *, slide_id: str, path) -> str | None:
    """One line naming both sides when features (their attrs) were made otherwise than the model's
    training features; None when every field both record agrees."""
    have = features_provenance(attrs)
    fields = differing_fields(training, have)
    if not fields:
        return None
    return (f"features of slide {slide_id!r} ({path}) were made by {describe(have)}; the model was "
            f"trained on {describe(training)} ({', '.join(_LABELS[f] for f in fields)} differ): "
            f"{_fix(training, have, fields)}")


def _fix(training: Mapping, have: Mapping, fields: list[str]) -> str:
    if {"coord_dims", "modality"} & set(fields):
        return (f"a model trained on {_kind(training)} cannot score {_kind(have)}; use a model trained on "
                f"{_kind(have)}")
    return f"{extract_hint(training)}, or use a model trained on these features"


def extract_hint(training: Mapping) -> str:
    """'extract with extract.encoder X, extract.checkpoint …, tiling.target_mpp 0.5, …'."""
    settings = []
    if training.get("encoder"):
        settings.append(f"extract.encoder {training['encoder']}")
    w = training.get("weights_sha256")
    if w:
        settings.append(f"extract.checkpoint {w}" if w in ("random", "none") or str(w).startswith("hf-hub:")
                        else f"extract.checkpoint the weights file with sha256 {_short(w)}")
    if training.get("target_mpp") is not None:
        settings.append(f"tiling.target_mpp {_num(training['target_mpp'])}")
    if training.get("patch_size_px") is not None and training.get("coord_dims") != 3:
        settings.append(f"tiling.patch_size_px {training['patch_size_px']}")
    if training.get("coord_dims") == 3:
        settings.append("the model's `volumes` settings")
    return ("tile and extract these slides as the model's training features were made (" + ", ".join(settings)
            + ") into a run folder and pass that as --run")


# -- which file features were made from --------------------------------------------------------------
def source_identity(record) -> dict:
    """{"size_bytes", "fingerprint"} of the manifest row's file now (slides/identity.py; a volume's
    NIfTI file or DICOM folder through volumes.stages.volume_identity). Raises SlideError when it
    is gone."""
    from ..slides.identity import file_fingerprint

    path = Path(record.path)
    if not path.exists():
        raise SlideError(record.slide_id, f"file not found: {path}")
    if getattr(record, "is_volume", False):
        from ..volumes.stages import volume_identity

        ident = volume_identity(path)
        return {"size_bytes": int(ident.size_bytes), "fingerprint": ident.fingerprint}
    size = path.stat().st_size
    return {"size_bytes": int(size), "fingerprint": file_fingerprint(path, size)}


def identity_difference(recorded: Mapping, now: Mapping) -> str:
    """'' when the same file; else what differs, in words."""
    if int(recorded["size_bytes"]) != int(now["size_bytes"]):
        return f"recorded {int(recorded['size_bytes'])} bytes, the manifest's file has {int(now['size_bytes'])}"
    if recorded["fingerprint"] != now["fingerprint"]:
        return "same size, content fingerprint differs"
    return ""


def source_mismatch(record, attrs: Mapping, *, path) -> str | None:
    """One line when features (attrs) were made from another file than the manifest row's; None when
    the same, or when the features record no identity (files from before it)."""
    from ..slides.identity import SlideIdentity

    recorded = SlideIdentity.from_attrs(attrs)
    if recorded is None:
        return None
    diff = identity_difference({"size_bytes": recorded.size_bytes, "fingerprint": recorded.fingerprint},
                               source_identity(record))
    if not diff:
        return None
    return (f"features of slide {record.slide_id!r} ({path}) were made from another file than the manifest's "
            f"{record.path} ({diff}): tile and extract this manifest's slides first (into a new run folder "
            f"when they are new slides whose ids this run already uses) and pass that as --run")


# -- the consumers' check --------------------------------------------------------------------------
def locate_features(run, record, training: Mapping) -> Path:
    """RUN/features/{the model's encoder}/{slide_id}.h5, checked against `training` (what the model
    was trained on) and the manifest row's file. Raises ProvenanceError on a mismatch (including
    "no features of the model's encoder, but another encoder's"), SlideError when the slide has no
    features at all or they cannot be read."""
    from .features_h5 import read_features_attrs

    encoder = training.get("encoder")
    if not encoder:
        raise PipelineError("the model's config.json does not name the encoder its features came from")
    path = run.features_h5(encoder, record.slide_id)
    if not path.is_file():
        other = _other_features(run, record.slide_id, encoder)
        if other is not None:
            other_path, other_attrs = other
            raise ProvenanceError(record.slide_id, (
                f"slide {record.slide_id!r} has no features of encoder {encoder!r} (the model's) at {path}; "
                f"the run holds {other_path}, made by {describe(features_provenance(other_attrs))}; the model "
                f"was trained on {describe(training)}: {extract_hint(training)}, or use a model trained "
                f"on {features_provenance(other_attrs)['encoder']!r} features"))
        raise SlideError(record.slide_id, f"no features file at {path} (run the extract stage first)")
    try:
        attrs = read_features_attrs(path)
    except (OSError, KeyError, ValueError) as exc:
        raise SlideError(record.slide_id, f"unreadable features file {path}: {exc}") from None
    problem = features_mismatch(training, attrs, slide_id=record.slide_id, path=path) \
        or source_mismatch(record, attrs, path=path)
    if problem:
        raise ProvenanceError(record.slide_id, problem)
    return path


def check_features(stage: str, run, records: Iterable, training_of: Callable) -> dict[str, str]:
    """Every slide's features checked before a consumer writes anything: raises one PipelineError
    listing every mismatch (ProvenanceError lines); returns {slide_id: message} of slides whose
    features are missing or unreadable, which the stage reports per slide as before.
    `training_of(record)`: the model's training features for that slide, or None (no usable model:
    the stage reports that itself)."""
    mismatches, missing = [], {}
    for record in records:
        training = training_of(record)
        if training is None:
            continue
        try:
            locate_features(run, record, training)
        except ProvenanceError as exc:
            mismatches.append(exc.message)
        except SlideError as exc:
            missing[record.slide_id] = str(exc)
    raise_mismatches(stage, mismatches)
    return missing


def raise_mismatches(stage: str, lines: list[str]) -> None:
    if not lines:
        return
    if len(lines) == 1:
        raise ProvenanceError(None, f"{stage}: {lines[0]}; nothing was written")
    shown = "\n".join(f"  - {line}" for line in lines[:MAX_LISTED])
    more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
    raise ProvenanceError(None, f"{stage}: {len(lines)} slide(s) have features the model cannot use, "
                                f"nothing was written\n{shown}{more}")


def checkpoint_mismatch(what: str, recorded: str | None, current: str, fix: str) -> str | None:
    """One line when `what` was made by checkpoint `recorded` (None: not recorded) but the
    checkpoint is now `current`."""
    if recorded == current:
        return None
    made = f"made by checkpoint {recorded}" if recorded else "made by an unrecorded checkpoint"
    return f"{what} were {made}, but the checkpoint is now {current}: {fix}"


def _other_features(run, slide_id: str, encoder: str):
    """(path, attrs) of this slide's features under another encoder folder of the run, or None."""
    from .features_h5 import read_features_attrs

    root = Path(run.root) / "features"
    if not root.is_dir():
        return None
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != encoder):
        candidate = folder / f"{slide_id}.h5"
        if candidate.is_file():
            try:
                return candidate, read_features_attrs(candidate)
            except (OSError, KeyError, ValueError):
                continue
    return None


def _kind(p: Mapping) -> str:
    if p.get("coord_dims") == 3 or p.get("modality") not in (None, SLIDE_MODALITY):
        return f"{p.get('modality') or ''} volume features".replace("  ", " ").strip()
    return "whole-slide image features"


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 16 or ":" in text else text[:12] + "…"


def _num(x) -> str:
    return str(round(float(x), 4))


def _str(value):
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
