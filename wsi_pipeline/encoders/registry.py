"""Encoder registry (timm-style): `create_encoder(name, checkpoint=...)`.

Each entry carries what preprocessing needs (input size, mean/std, native µm/px, output dim) and
where it comes from (patch size, licenses, reference), as metadata of the shared registry
mechanism (:mod:`wsi_pipeline.models.registry`; ``ENCODERS.get_metadata(name)``).
Any timm architecture name works too; registered entries add the pathology-specific ones
(CLAM's truncated ResNet-50, UNI-style ViT-L/16).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import PipelineError
from ..models.registry import Registry
from .weights import (EncoderWeightsError, checkpoint_sha256, describe_fit, fitting_encoders, load_into,
                      read_state_dict, state_for, warn_if_named_for_another)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    build: Callable[..., nn.Module]       # architecture with random init, no head; kwargs override timm's
    out_dim: int
    input_size_px: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    native_mpp: float | None = None       # resolution the weights were trained at, if known
    ignore_prefixes: tuple[str, ...] = ()  # checkpoint keys of parts this encoder removes
    notes: str = ""
    parameter_free: bool = False          # no weights at all (checkpoint: none)
    patch_size_px: int | None = None      # side of a ViT token patch; None for CNNs and descriptors
    license: str = ""                     # of the code that builds the architecture
    weights_license: str = ""             # of the weights the entry is meant for (they come from the user)
    reference: str = ""                   # paper / repository it follows
    # Bumped when a built-in encoder's outputs change for the same weights; > 1 enters the extract
    # config hash (features of another version are re-extracted) and is recorded in features.h5.
    version: int = 1
    # -- the authors' preprocessing (Encoder.preprocess applies it on the device, uint8 in) --------
    # The patch (tiling.patch_size_px at tiling.target_mpp) is resized so that its side is
    # `resize_px` (None: fed at its own size, e.g. timm ViTs with dynamic_img_size), then centre-
    # cropped to `crop_px` (None: no crop); `interpolation` is "bilinear" or "bicubic".
    resize_px: int | None = None
    interpolation: str = "bilinear"
    antialias: bool = False
    crop_px: int | None = None
    # -- what the entry computes and how it is meant to be used ------------------------------------
    output: str = ""                      # output rule: "cls", "cls+mean(patch tokens, no registers)", ...
    recommended_patch_px: int | None = None   # patch side the authors tiled at native_mpp (before resize)
    precision: str = "fp32"               # recommended autocast on a GPU: fp32, fp16 or bf16 (CPU: fp32)
    gated: bool = False                   # weights behind an access request on their hub page
    hub_repo: str = ""                    # where users download the weights (e.g. "MahmoodLab/UNI")
    files: tuple[str, ...] = ()           # the files a user downloads, names as on the model's page
    # Release layout -> this build's state-dict keys (prefixes, chunked blocks, other libraries'
    # names); applied after the generic unwrapping of weights.read_state_dict. None: keys as built.
    convert_state_dict: Callable[[dict], dict] | None = None
    aliases: tuple[str, ...] = ()         # other registry names for the same entry
    # -- volumes (wsi_pipeline/volumes/instances.py) -----------------------------------------------
    # 2: images (B, 3, H, W) uint8; 3: sub-volumes (B, C, D, H, W) float in [0, 1] (mean/std per
    # channel, C = len(mean)). min_input_px: the smallest instance box side (px or voxels) the entry gives
    # finite, meaningful features for at its own size; a volume geometry below it is a config error.
    input_dims: int = 2
    min_input_px: int = 1

    def __call__(self, **overrides) -> nn.Module:
        """The registry's builder: the architecture with random init (``overrides`` go to ``build``)."""
        return self.build(**overrides)

    def metadata(self) -> dict[str, Any]:
        return {"out_dim": self.out_dim, "input_size_px": self.input_size_px, "patch_size_px": self.patch_size_px,
                "native_mpp": self.native_mpp, "mean": tuple(self.mean), "std": tuple(self.std),
                "parameter_free": self.parameter_free, "license": self.license,
                "weights_license": self.weights_license, "reference": self.reference, "notes": self.notes,
                "version": self.version, "resize_px": self.resize_px, "interpolation": self.interpolation,
                "antialias": self.antialias, "crop_px": self.crop_px, "output": self.output,
                "recommended_patch_px": self.recommended_patch_px, "precision": self.precision,
                "gated": self.gated, "hub_repo": self.hub_repo, "files": tuple(self.files),
                "aliases": tuple(self.aliases), "input_dims": self.input_dims, "min_input_px": self.min_input_px}


ENCODERS = Registry("encoder", fields={
    "out_dim": (int,), "input_size_px": (int,), "patch_size_px": (int, type(None)),
    "native_mpp": (float, type(None)), "mean": (tuple,), "std": (tuple,), "parameter_free": (bool,),
    "weights_license": (str,)})


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    """Register ``spec`` under ``spec.name`` and each of its aliases; its fields become the entry's
    metadata. An alias resolves to a spec of its own name (features go to RUN/features/{alias}/)."""
    if spec.interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"encoder {spec.name!r}: interpolation must be bilinear or bicubic")
    if spec.precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"encoder {spec.name!r}: precision must be fp32, fp16 or bf16")
    ENCODERS.add(spec.name, spec, **spec.metadata())
    for alias in spec.aliases:
        aliased = replace(spec, name=alias, aliases=(), notes=(f"alias of {spec.name}. " + spec.notes).strip())
        ENCODERS.add(alias, aliased, **aliased.metadata())
    return spec


def list_encoders() -> list[str]:
    return ENCODERS.list()


def get_spec(name: str) -> EncoderSpec:
    """A registered spec, or one derived from any timm architecture name."""
    if name in ENCODERS:
        return ENCODERS.entry(name).builder
    import timm

    if not timm.is_model(name):
        raise PipelineError(f"unknown encoder {name!r}: not registered ({', '.join(list_encoders())}) "
                            f"and not a timm architecture")
    probe = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = probe.pretrained_cfg
    return EncoderSpec(name=name, build=lambda: timm.create_model(name, pretrained=False, num_classes=0),
                       out_dim=int(probe.num_features), input_size_px=int(cfg.get("input_size", (3, 224))[-1]),
                       mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)))


class Encoder(nn.Module):
    """A patch encoder that takes uint8 RGB batches (B, 3, H, W) and returns features (B, D).

    Normalisation happens here, on the model's device, so data loaders ship compact uint8.
    """

    def __init__(self, model: nn.Module, spec: EncoderSpec, weights_source: str, weights_sha256: str):
        super().__init__()
        self.model = model
        self.spec = spec
        self.weights_source = weights_source
        self.weights_sha256 = weights_sha256
        # 2-D entries take uint8 (0-255), 3-D entries float sub-volumes in [0, 1].
        shape, scale = ((1, -1, 1, 1, 1), 1.0) if spec.input_dims == 3 else ((1, 3, 1, 1), 255.0)
        self.register_buffer("mean", torch.tensor(spec.mean).view(*shape) * scale, persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(*shape) * scale, persistent=False)

    @property
    def out_dim(self) -> int:
        return self.spec.out_dim

    @property
    def input_size_px(self) -> int:
        return self.spec.input_size_px

    def normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() - self.mean) / self.std

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, S, S) normalised float: the spec's resize, crop, mean/std.
        3-D entries: (B, C, D, H, W) float in [0, 1] -> normalised (the volume path sizes them)."""
        if self.spec.input_dims == 3:
            return self.normalise(images_uint8)
        return self.normalise(resize_and_crop(images_uint8, self.spec))

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(images_uint8))


def resize_and_crop(images: torch.Tensor, spec: EncoderSpec) -> torch.Tensor:
    """The spec's resize (shorter side to ``resize_px``) and centre crop (``crop_px``) of (B, 3, H, W).

    Float math on the device. uint8 input is resized like the authors' transform on a PIL image:
    PIL resamples width then height and rounds to uint8 after each pass, which clips bicubic
    overshoot in between, so bicubic runs the two passes with that rounding (halves up, as PIL);
    the result is within one uint8 level of PIL's but for rare pixels that PIL's 22-bit fixed-point
    bicubic weights move by two (tests/encoders/test_vit_family.py).
    """
    h, w = images.shape[-2:]
    if spec.resize_px is not None and min(h, w) != spec.resize_px:
        # torchvision's Resize(int): shorter side to resize_px, longer side truncated.
        size = (spec.resize_px, int(spec.resize_px * w / h)) if h <= w else (int(spec.resize_px * h / w),
                                                                           spec.resize_px)
        if images.dtype == torch.uint8:
            # float64 keeps the rounding between passes stable (MPS has no float64)
            out = images.to(torch.float32 if images.device.type == "mps" else torch.float64)
            # Bilinear never overshoots, so one float pass is closest to PIL; bicubic needs PIL's
            # uint8 clipping between its two passes.
            passes = ((h, size[1]), size) if spec.interpolation == "bicubic" else (size,)
            for pass_size in passes:  # width, then height
                if tuple(out.shape[-2:]) != pass_size:
                    out = torch.nn.functional.interpolate(out, size=pass_size, mode=spec.interpolation,
                                                          align_corners=False, antialias=spec.antialias)
                    out = out.add_(0.5).floor_().clamp_(0, 255)  # PIL rounds halves up
            images = out.to(torch.uint8)
        else:
            images = torch.nn.functional.interpolate(images, size=size, mode=spec.interpolation,
                                                     align_corners=False, antialias=spec.antialias)
        h, w = size
    if spec.crop_px is not None and (h, w) != (spec.crop_px, spec.crop_px):
        if min(h, w) < spec.crop_px:
            raise ValueError(f"encoder {spec.name!r}: {h}x{w} px input is smaller than its "
                             f"{spec.crop_px} px centre crop")
        # torchvision's CenterCrop offsets: int(round((side - crop) / 2)).
        top, left = int(round((h - spec.crop_px) / 2.0)), int(round((w - spec.crop_px) / 2.0))
        images = images[..., top:top + spec.crop_px, left:left + spec.crop_px]
    return images


def create_encoder(name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu") -> Encoder:
    """Build encoder `name` with weights from `checkpoint`:

    - a local file (`.safetensors`, or `.pth`/`.bin`/`.pt` loaded with `weights_only=True`) or an
      untouched model-hub snapshot folder (config.json + weights); release nestings, prefixes and
      DINOv2 layouts are undone (weights.py), and a file for another model is an error that
      names the encoders it fits;
    - `"hf-hub:org/repo"`: timm downloads it (needs a reachable hub; air-gapped sites pass a file);
    - `"random"`: random init, only when asked — recorded as `weights_sha256 = "random"`;
    - `"none"` (or None): for parameter-free encoders (`stain_texture`), which have no weights.
    """
    if name in ENCODERS and get_spec(name).parameter_free:
        spec = get_spec(name)
        if checkpoint not in (None, "none"):
            raise EncoderWeightsError(f"encoder {name!r} has no weights; set extract.checkpoint: none "
                                      f"(got {checkpoint!r})")
        encoder = Encoder(spec.build().eval(), spec, weights_source="none", weights_sha256="none")
        return encoder.to(device)
    if checkpoint is None:
        raise EncoderWeightsError(
            f"encoder {name!r}: no weights given; pass a checkpoint file, an 'hf-hub:' id, or "
            f"'random' to run with random weights on purpose")
    checkpoint = str(checkpoint)
    if checkpoint.startswith("hf-hub:"):
        model, spec = _from_hub(name, checkpoint)
        sha = "hf-hub:" + hashlib.sha256(checkpoint.encode()).hexdigest()
    else:
        spec = get_spec(name)
        path = Path(checkpoint)
        # The file first: an unreadable or refused checkpoint fails before a large model is built.
        raw = None if checkpoint == "random" else read_state_dict(path)
        model = spec.build()
        if raw is None:
            sha = "random"
        else:
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            load_into(model, state_for(spec, raw, expected), source=str(path),
                      ignore_prefixes=spec.ignore_prefixes, encoder=name,
                      identify=lambda _: identify_checkpoint(raw, str(path), name))
            warn_if_named_for_another(path, name, {n: get_spec(n).files for n in list_encoders()})
            sha = checkpoint_sha256(path)
    encoder = Encoder(model.eval(), spec, weights_source=checkpoint, weights_sha256=sha)
    return encoder.to(device)


def identify_checkpoint(state: dict, source: str, encoder: str) -> str:
    """Which registered encoders the tensors of ``state`` fit, as the sentence for an error.

    Every entry is built once on the meta device (cached); aliases and output variants of the
    same release (same hub repo and files) are named as one choice, entries that share shapes but
    not weights (uni / mstar) are named as indistinguishable."""
    specs = [get_spec(n) for n in list_encoders()]
    aliases = {alias: s.name for s in specs for alias in s.aliases}
    by_name = {s.name: s for s in specs}

    def same_release(a: str, b: str) -> bool:
        sa, sb = by_name[a], by_name[b]
        return bool(sa.hub_repo) and (sa.hub_repo, sa.files) == (sb.hub_repo, sb.files)

    return describe_fit(source, encoder, fitting_encoders(state, specs), aliases, same_release)


def _from_hub(name: str, hub_id: str):
    import timm

    base = get_spec(name) if name in ENCODERS else None
    try:
        model = timm.create_model(hub_id, pretrained=True, num_classes=0,
                                  **({"init_values": 1e-5} if name.startswith("uni") else {}))
    except Exception as exc:  # offline, gated repo, no token
        raise EncoderWeightsError(
            f"cannot fetch {hub_id} ({type(exc).__name__}: {exc}); on machines without hub access, "
            f"download the weights elsewhere and pass the local file as the checkpoint") from None
    cfg = model.pretrained_cfg
    spec = EncoderSpec(name=name, build=lambda: model, out_dim=int(model.num_features),
                       input_size_px=int(cfg.get("input_size", (3, 224))[-1]),
                       mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
                       native_mpp=base.native_mpp if base else None)
    return model, spec
