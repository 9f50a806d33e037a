"""How a tiling and a precision fit an encoder: `tiling: auto` resolved from the registry, the warning
for a tiling far from the authors', and the autocast `extract.precision: auto` means.

wsi_pipeline.run.config imports this module only for `auto` tiling, so plain configs stay torch-free.
"""

from __future__ import annotations

from ..errors import ConfigError

# A tiling more than this far (relative) from the encoder's recommended µm/px or tile side warns.
FIT_TOLERANCE = 0.25
# What `precision: auto` meant before encoders recorded a recommendation (features.patches.autocast_for).
LEGACY_AUTO = {"cuda": "bf16", "cpu": "fp32"}


def _registered_spec(encoder: str):
    from . import get_spec, list_encoders

    return get_spec(encoder) if encoder in list_encoders() else None


def resolve_auto_tiling(target_mpp, patch_size_px, encoder: str) -> tuple[float, int]:
    """`auto` values -> the encoder's native_mpp / recommended_patch_px; others are returned as given.
    An encoder that records none is a ConfigError naming the key to set."""
    spec = _registered_spec(encoder) if "auto" in (target_mpp, patch_size_px) else None
    recorded = {"target_mpp": getattr(spec, "native_mpp", None),
                "patch_size_px": getattr(spec, "recommended_patch_px", None)}
    values = {"target_mpp": target_mpp, "patch_size_px": patch_size_px}
    for key, value in values.items():
        if value != "auto":
            continue
        if recorded[key] is None:
            what = "µm/px" if key == "target_mpp" else "tile side"
            raise ConfigError(f"tiling.{key}: auto takes the encoder's recommended {what}, but extract.encoder "
                              f"{encoder!r} records none; set tiling.{key} to a number "
                              f"(`wsi-pipeline encoders` lists the entries that record it)")
        values[key] = recorded[key]
    return float(values["target_mpp"]), int(values["patch_size_px"])


def tiling_fit_warning(encoder: str, target_mpp: float, patch_size_px: int) -> str | None:
    """One line when the tiling is more than FIT_TOLERANCE from the encoder's recommendation, else None
    (also None for encoders that record no recommendation)."""
    spec = _registered_spec(encoder)
    if spec is None:
        return None
    problems = []
    if spec.native_mpp is not None and abs(target_mpp / spec.native_mpp - 1) > FIT_TOLERANCE:
        problems.append(f"{target_mpp:g} µm/px (the encoder's authors: {spec.native_mpp:g} µm/px, "
                        f"{target_mpp / spec.native_mpp:.2f}x)")
    if spec.recommended_patch_px is not None and abs(patch_size_px / spec.recommended_patch_px - 1) > FIT_TOLERANCE:
        problems.append(f"{patch_size_px} px tiles (the authors': {spec.recommended_patch_px} px)")
    if not problems:
        return None
    return (f"encoder {encoder!r}: tiling at {' and '.join(problems)}: features may be off the ones its "
            f"weights were trained for; `tiling: {{target_mpp: auto, patch_size_px: auto}}` takes the "
            f"authors' (or configs/encoders/{spec.name}.yaml)")


def effective_precision(requested: str, encoder: str, device_type: str) -> str:
    """The autocast extraction runs at: `auto` is the encoder's recommendation on a GPU (bf16 for
    encoders the registry does not know, as before), fp32 on CPU; anything else as given."""
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "fp32"
    spec = _registered_spec(encoder)
    return spec.precision if spec is not None else LEGACY_AUTO["cuda"]
