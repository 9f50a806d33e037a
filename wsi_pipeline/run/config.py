"""One YAML config, validated into plain dataclasses. Unknown keys and wrong types are errors.

Deep code takes arguments, not this object: stages unpack the section they need.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..detection.params import DetectTrainParams
from ..errors import ConfigError
from ..segmentation.params import SegmenterFitParams
from .names import check_name


@dataclass(frozen=True)
class SlideConfig:
    # "auto": OpenSlide first, tiffslide where OpenSlide cannot open the file.
    backend: str = "auto"

    def __post_init__(self):
        if self.backend not in ("auto", "openslide", "tiffslide"):
            raise ConfigError(f"slides.backend: must be auto, openslide or tiffslide, got {self.backend!r}")


@dataclass(frozen=True)
class TissueConfig:
    # Resolution of the image tissue is detected on (the pyramid level nearest to it, resized).
    mask_mpp: float = 8.0
    # None: Otsu on HSV saturation; a number in (0, 1) fixes the threshold.
    saturation_threshold: float | None = None
    # Otsu is floored here so a glass-only slide (saturation noise) yields no tissue.
    min_saturation: float = 0.05
    median_kernel_um: float = 64.0
    closing_um: float = 32.0
    min_tissue_area_um2: float = 50_000.0
    # Holes in the tissue (lumen, fat, tears) of at least min_hole_area_um2 stay out of the mask, as
    # in CLAM and TRIDENT: a patch lying wholly on the glass of a hole is not tiled. false fills
    # every hole.
    keep_holes: bool = True
    # With keep_holes, holes smaller than this are still filled.
    min_hole_area_um2: float = 20_000.0

    def __post_init__(self):
        _positive("tissue.mask_mpp", self.mask_mpp)
        if not self.mask_mpp <= 1000:
            raise ConfigError(f"tissue.mask_mpp: must be <= 1000 µm/px, got {self.mask_mpp!r}")
        if self.saturation_threshold is not None and not 0 < self.saturation_threshold < 1:
            raise ConfigError("tissue.saturation_threshold: must be null or in (0, 1)")
        for name in ("median_kernel_um", "closing_um", "min_tissue_area_um2", "min_hole_area_um2"):
            if getattr(self, name) < 0:
                raise ConfigError(f"tissue.{name}: must be >= 0")


@dataclass(frozen=True)
class TilingConfig:
    # Physical resolution of the patches, µm per pixel: patches are read at the nearest finer
    # pyramid level and resized, so every slide's patches cover the same tissue area.
    # auto (either key): the encoder's own (extract.encoder's recommended µm/px and tile side, see
    # `wsi-pipeline encoders`), resolved when the config is loaded; outputs record the numbers.
    target_mpp: float | str = 0.5
    patch_size_px: int | str = 224
    # Overlap between neighbouring patches, in target pixels (stride = patch_size_px - overlap_px).
    overlap_px: int = 0
    # Keep a patch when at least this fraction of its area is tissue.
    min_tissue_fraction: float = 0.25
    # A level counts as "at" the target mpp within this relative tolerance (scanner rounding).
    mpp_tolerance: float = 0.02
    # A target_mpp finer than a slide's own resolution (beyond mpp_tolerance) invents pixels by
    # upsampling: an error for that slide unless this is true. Not part of the outputs' hash: a
    # slide tiled under false tiles identically under true.
    allow_upsampling: bool = field(default=False, metadata={"hash": False})

    def __post_init__(self):
        for key, kind in (("target_mpp", "a number"), ("patch_size_px", "an integer")):
            if isinstance(getattr(self, key), str) and getattr(self, key) != "auto":
                raise ConfigError(f"tiling.{key} must be {kind} or auto, got {getattr(self, key)!r}")
        if self.is_auto():
            return  # checked once Config has resolved it from the encoder
        _positive("tiling.target_mpp", self.target_mpp)
        if not _MPP_LIMITS[0] <= self.target_mpp <= _MPP_LIMITS[1]:
            raise ConfigError(f"tiling.target_mpp: must be in [{_MPP_LIMITS[0]}, {_MPP_LIMITS[1]}] µm/px "
                              f"(0.5 ≈ 20×, 0.25 ≈ 40×), got {self.target_mpp!r}")
        if not 8 <= self.patch_size_px <= _MAX_PATCH_PX:
            raise ConfigError(f"tiling.patch_size_px: must be in [8, {_MAX_PATCH_PX}], got {self.patch_size_px!r}")
        if not 0 <= self.overlap_px < self.patch_size_px:
            raise ConfigError("tiling.overlap_px: must be in [0, patch_size_px)")
        if not 0 <= self.min_tissue_fraction <= 1:
            raise ConfigError("tiling.min_tissue_fraction: must be in [0, 1]")
        if not 0 <= self.mpp_tolerance < 0.5:
            raise ConfigError("tiling.mpp_tolerance: must be in [0, 0.5)")

    def is_auto(self) -> bool:
        return "auto" in (self.target_mpp, self.patch_size_px)


@dataclass(frozen=True)
class ExtractConfig:
    # A registered encoder (resnet50_trunc, vit_small_patch16, vit_base_patch16, vit_large_patch16,
    # uni_vit_l16) or any timm architecture name. It names the folder RUN/features/{encoder}/, so
    # it follows the name rule of wsi_pipeline.run.names (letters, digits, `._-`, <= 128 characters).
    encoder: str = "resnet50_trunc"
    # Weights: a local .safetensors/.pth/.bin file, an "hf-hub:org/name" id, or "random"
    # (explicitly random weights; recorded as such in every features.h5).
    checkpoint: str | None = None
    # auto: cuda if available, else cpu.
    device: str = "auto"
    # auto: the encoder's recommended autocast on GPU (`wsi-pipeline encoders NAME`: precision; bf16
    # for unregistered timm names), fp32 on CPU; or fp32, bf16, fp16. features.h5 records the one used.
    precision: str = "auto"
    # Patches per batch; null: 32 on CPU, 256 on GPU (a ViT-B/16 in bf16 is still fast at 256 on an H100).
    batch_size: int | None = None
    # DataLoader reader processes; null: 1 on CPU (the encoder needs the cores), cores-2 (≤ 16) on GPU.
    num_workers: int | None = None
    # Stored feature dtype: float32, or float16 to halve disk use.
    features_dtype: str = "float32"
    # Patch reader. auto: tiled TIFF/SVS levels (JPEG, deflate, LZW, raw) are read tile by tile, each
    # tile decoded once per batch (same pixels, several times the patches/s); other formats and
    # levels keep the region reader of slides.backend. direct: only that (a slide it cannot read
    # fails, naming why); region: always the region reader. features.h5 records the one used.
    reader: str = "auto"

    def __post_init__(self):
        check_name(self.encoder, "extract.encoder")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError("extract.precision: must be auto, fp32, bf16 or fp16")
        if self.features_dtype not in ("float32", "float16"):
            raise ConfigError("extract.features_dtype: must be float32 or float16")
        if self.reader not in ("auto", "direct", "region"):
            raise ConfigError(f"extract.reader: must be auto, direct or region, got {self.reader!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError("extract.batch_size: must be >= 1 or null")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError("extract.num_workers: must be >= 0 or null")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError("extract.device: must be auto, cpu, cuda or cuda:N")


# The sections below are owned by the stages that read them (train, heatmap, segment); each
# stage's module documents its keys in configs/default.yaml.
# Optimizers train.optimizer may name (training/trainer.py builds them).
OPTIMIZERS = ("adamw", "adam", "radam")
# Learning-rate schedules train.lr_schedule may name (training/trainer.py).
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    # Registered aggregator: mambamil, bimamba_mil, mamba_mil, gmmamba, fmamil, twodmamba, abmil, transmil,
    # mean, max.
    # It names the folders RUN/mil/{model}/ and RUN/heatmaps/{model}/ (name rule: wsi_pipeline.run.names).
    model: str = "mambamil"
    # Extra keyword arguments for the aggregator (e.g. {rate: 10, d_model: 512}).
    model_args: dict = field(default_factory=dict)
    # Ordered class names; empty: sorted distinct labels of the manifest.
    classes: list = field(default_factory=list)
    folds: int = 5
    # Fraction of each training fold's patients held out for early stopping.
    val_fraction: float = 0.2
    epochs: int = 20
    patience: int = 5
    # An epoch counts as an improvement for patience only when the monitored loss drops by more
    # than this (absolute); the best epoch's weights are kept either way.
    min_delta: float = 0.0
    # Early stopping never stops before this many epochs (CLAM's and MambaMIL's stop_epoch); 0: any.
    min_epochs: int = 0
    # Linear learning-rate warm-up over the first this many epochs (0: none).
    warmup_epochs: int = 0
    # constant, or cosine: lr * (1 + cos(pi * k / epochs)) / 2 in epoch k = 0, 1, ... (PyTorch's
    # CosineAnnealingLR stepped per epoch, T_max = epochs, eta_min 0: 2DMamba's recipe).
    lr_schedule: str = "constant"
    # Instance-level top-k cross-entropy added to the slide loss with this weight (0: off); needs
    # instance logits (fmamil, mean, max). instance_topk: instances averaged per class.
    instance_loss_weight: float = 0.0
    instance_topk: int = 2
    lr: float = 2.0e-4
    weight_decay: float = 1.0e-2
    # adamw (decoupled weight decay), adam (weight decay as L2 in the gradient, CLAM's and MambaMIL's
    # recipe) or radam (TransMIL's, without its Lookahead wrapper). training/trainer.py.
    optimizer: str = "adamw"
    # Bags per optimizer step (bags differ in length, so each bag is its own forward pass).
    grad_accumulation: int = 1
    # class_weights (weighted loss), sampler (weighted sampling) or none.
    balance: str = "class_weights"
    seed: int = 0
    # Deterministic torch algorithms (slower). On a GPU the mamba-ssm scan backward stays non-bitwise
    # (atomics; runs agree to ~1e-5): WSI_SSM_BACKEND=native for bitwise-identical runs.
    deterministic: bool = False
    device: str = "auto"
    # Bootstrap resamples (over patients) for the 95% CIs in metrics.json; 0: no CIs.
    bootstrap: int = 1000
    # Standardise each feature dimension with the mean/std of the training fold's instances (stored
    # in the fold checkpoint, applied by every consumer). training/standardize.py.
    standardize: bool = True
    # Subtract each bag's own centre before standardising (removes per-slide stain shift; stored in
    # the checkpoint as input_center_per_slide, applied by every consumer): median (what true means;
    # robust to lesions), mean, or false. training/standardize.py says why the median.
    center_per_slide: bool | str = False
    # Training passes only: drop this fraction of each bag's instances afresh every pass (at least
    # one kept); shuffle_instances: feed them in a random order (order-dependent scans).
    instance_dropout: float = 0.0
    shuffle_instances: bool = False
    # Bags are read from disk per pass (training/bag_source.py) through an LRU cache of at most this
    # many GiB; "auto": 10 % of physical memory, at most 8 GiB; 0: no cache. Results do not depend on it.
    bag_cache_gb: float | str = "auto"
    # Settings for one aggregator only, over the keys above whenever that model trains, so that one
    # config serves several models (e.g. fmamil's instance loss, which the others cannot take):
    #   per_model: {fmamil: {instance_loss_weight: 1.0, model_args: {final_norm: false}}}
    # model_args are merged key by key over train.model_args. `for_model` gives the result.
    per_model: dict = field(default_factory=dict)

    def for_model(self, model: str) -> "TrainConfig":
        """The settings `model` trains with: these, with train.per_model[model] over them."""
        override = dict(self.per_model.get(model, {}))
        if "model_args" in override:
            override["model_args"] = {**self.model_args, **override["model_args"]}
        return dataclasses.replace(self, model=model, per_model={}, **override)

    def __post_init__(self):
        check_name(self.model, "train.model")
        self._check_per_model()
        for name in ("standardize", "shuffle_instances"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"train.{name}: must be true or false, got {getattr(self, name)!r}")
        center = {True: "median", False: ""}.get(self.center_per_slide, self.center_per_slide)
        if center not in ("", "mean", "median"):
            raise ConfigError(f"train.center_per_slide: must be median, mean, true (= median) or false, "
                              f"got {self.center_per_slide!r}")
        object.__setattr__(self, "center_per_slide", center)  # frozen dataclass
        if self.center_per_slide and not self.standardize:
            raise ConfigError("train.center_per_slide: needs train.standardize: true (it is applied "
                              "by the same input standardisation)")
        if not 0 <= self.instance_dropout < 1:
            raise ConfigError("train.instance_dropout: must be in [0, 1)")
        if self.bag_cache_gb != "auto" and (isinstance(self.bag_cache_gb, (str, bool))
                                            or not self.bag_cache_gb >= 0):
            raise ConfigError(f"train.bag_cache_gb: must be auto or a number of GiB >= 0 (0: no cache), "
                              f"got {self.bag_cache_gb!r}")
        if self.folds < 2:
            raise ConfigError("train.folds: must be >= 2")
        if not 0 < self.val_fraction < 1:
            raise ConfigError("train.val_fraction: must be in (0, 1)")
        if self.balance not in ("class_weights", "sampler", "none"):
            raise ConfigError("train.balance: must be class_weights, sampler or none")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise ConfigError("train.warmup_epochs: must be >= 0 and < train.epochs")
        if self.min_delta < 0:
            raise ConfigError("train.min_delta: must be >= 0")
        if self.min_epochs < 0:
            raise ConfigError("train.min_epochs: must be >= 0 (0: early stopping at any epoch)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train.lr_schedule: must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer: must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.instance_loss_weight < 0:
            raise ConfigError("train.instance_loss_weight: must be >= 0 (0: off)")
        for name in ("epochs", "patience", "grad_accumulation", "instance_topk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1")
        _positive("train.lr", self.lr)
        if self.weight_decay < 0:
            raise ConfigError("train.weight_decay: must be >= 0")
        if self.bootstrap < 0:
            raise ConfigError("train.bootstrap: must be >= 0 (0: no confidence intervals)")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError("train.device: must be auto, cpu, cuda or cuda:N")
        if self.classes:
            names = [str(c) for c in self.classes]
            if len(names) < 2 or len(set(names)) != len(names):
                raise ConfigError(f"train.classes: need >= 2 distinct class names, got {self.classes!r}")
        if any(not isinstance(k, str) for k in self.model_args):
            raise ConfigError("train.model_args: keys must be argument names (strings)")

    def _check_per_model(self):
        """Each per_model entry: a valid model name mapping train keys (not model/per_model) to
        values of the key's type; the merged settings must pass the same checks as train itself."""
        hints = typing.get_type_hints(TrainConfig)
        allowed = sorted(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("model", "per_model"))
        coerced = {}
        for model, settings in self.per_model.items():
            if not isinstance(model, str):
                raise ConfigError(f"train.per_model: keys must be model names, got {model!r}")
            check_name(model, "train.per_model")
            key = f"train.per_model.{model}"
            if not isinstance(settings, dict):
                raise ConfigError(f"{key}: must be a mapping of train settings, got {settings!r}")
            unknown = sorted(set(map(str, settings)) - set(allowed))
            if unknown:
                raise ConfigError(f"{key}: unknown or not per-model key(s) {', '.join(unknown)} "
                                  f"(allowed: {', '.join(allowed)})")
            coerced[model] = {name: _coerce(hints[name], value, f"{key}.{name}", "config")
                              for name, value in settings.items()}
        object.__setattr__(self, "per_model", coerced)  # frozen dataclass
        for model in coerced:
            try:
                self.for_model(model)
            except ConfigError as exc:
                raise ConfigError(f"train.per_model.{model}: {exc}") from None


@dataclass(frozen=True)
class HeatmapConfig:
    # Score normalisation: rank (percentile of the slide's own patches), minmax, or raw.
    normalize: str = "rank"
    # Gaussian smoothing sigma in µm (0: none).
    smooth_um: float = 0.0
    # Colormap (wsi_pipeline.exports.colormaps): jet, viridis, magma, inferno, plasma, gray.
    colormap: str = "jet"
    # Overlay opacity on the thumbnail.
    alpha: float = 0.5
    # Longest side of the PNG overlay in pixels.
    png_max_px: int = 2048
    # Patch images exported for the top/bottom-scoring k patches.
    top_k: int = 8
    # Which exports to write: png, tif, geojson, topk.
    exports: list = field(default_factory=lambda: ["png", "tif", "geojson", "topk"])
    # What is mapped: "instance" (the ensemble's per-patch score) or a class name (per-patch
    # softmax probability of that class, for models with instance logits).
    score: str = "instance"
    # QuPath object type of the GeoJSON patches: tile or detection.
    object_type: str = "tile"
    # Normalised-score bounds of the GeoJSON classes: low < [0] <= medium < [1] <= high.
    class_thresholds: list = field(default_factory=lambda: [0.5, 0.8])

    def __post_init__(self):
        if self.normalize not in ("rank", "minmax", "raw"):
            raise ConfigError("heatmap.normalize: must be rank, minmax or raw")
        if not 0 <= self.alpha <= 1:
            raise ConfigError("heatmap.alpha: must be in [0, 1]")
        if self.smooth_um < 0:
            raise ConfigError("heatmap.smooth_um: must be >= 0")
        if self.png_max_px < 64:
            raise ConfigError("heatmap.png_max_px: must be >= 64")
        if self.top_k < 0:
            raise ConfigError("heatmap.top_k: must be >= 0")
        if not self.score:
            raise ConfigError("heatmap.score: must be 'instance' or a class name")
        if self.object_type not in ("tile", "detection"):
            raise ConfigError("heatmap.object_type: must be tile or detection")
        t = self.class_thresholds
        if (len(t) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in t)
                or not 0 <= t[0] <= t[1] <= 1):
            raise ConfigError("heatmap.class_thresholds: must be two numbers 0 <= low <= high <= 1")
        unknown = sorted(set(self.exports) - {"png", "tif", "geojson", "topk"})
        if unknown:
            raise ConfigError(f"heatmap.exports: unknown export(s) {unknown}; known: png, tif, geojson, topk")


@dataclass(frozen=True)
class SegmentConfig(SegmenterFitParams):
    """The segment section: the segmenter's training parameters (`SegmenterFitParams`: epochs,
    steps_per_epoch, batch_size, crop_px, lr, correct_*, window_px, overlap, seed, under the same
    keys) composed with the stage's own settings below."""
    # Registered segmenter (wsi_pipeline.models.seg): vmunet_tiny (CPU), vmunet_small (GPU).
    model: str = "vmunet_tiny"
    # Extra keyword arguments for the segmenter (e.g. {dims: [16, 32, 64], patch_size: 4}).
    model_args: dict = field(default_factory=dict)
    # Resolution (µm/px) the segmenter trains and predicts at (rounded to an integer downsample).
    work_mpp: float = 8.0
    # Resolution (µm/px) of the lesion mask written per slide.
    mask_mpp: float = 8.0
    # CAM thresholds for pseudo-labels: above high -> lesion, below low -> background, between -> soft.
    cam_high: float = 0.7
    cam_low: float = 0.3
    # Loss weight of soft (between-threshold) pseudo-labels; confident ones weigh 1.
    soft_weight: float = 0.3
    # Class whose CAM is the lesion; "" = the model's last class.
    lesion_class: str = ""
    # Per-patch CAM from the fold ensemble: auto (instance logits' probability where the model has
    # them, else instance_scores), or instance_scores (min-max instance scores, e.g. fmamil's
    # attention, times the slide probability of the lesion class) for a model whose CAMs do not
    # localise while its attention does (benchmarks/results/mil_hard.md).
    cam_score: str = "auto"
    # Slides labelled (manifest) with another class are all background for training.
    negatives_background: bool = True
    # Calibration on those negative slides (0: off): cam_high is raised to at least this quantile
    # of their patches' CAM scores, since a score that normal tissue reaches is no lesion evidence.
    # Chosen from the run's own labelled slides, recorded in model/config.json.
    negative_quantile: float = 0.999
    # Stage-2 mask kept only where the slide's CAM map is >= cam_gate (0: no floor) and, with
    # gate_negatives, >= that quantile too: the segmenter draws the outline, the CAM says where a
    # lesion may be. On the hard demo (lesions the segmenter cannot tell from confounders at
    # work_mpp) it took Dice 0.62 -> 0.73 and normal tissue marked 1.4% -> 0.3%; where the
    # segmenter sees lesions the CAM scores low (partly covered patches) it cuts them, hence off
    # by default (benchmarks/results/mil_hard.md).
    cam_gate: float = 0.0
    gate_negatives: bool = False
    # Probability threshold of the mask, and the smallest lesion piece kept (µm²).
    threshold: float = 0.5
    min_lesion_area_um2: float = 2_000.0
    device: str = "auto"

    def __post_init__(self):
        check_name(self.model, "segment.model")
        _positive("segment.work_mpp", self.work_mpp)
        _positive("segment.mask_mpp", self.mask_mpp)
        _positive("segment.lr", self.lr)
        if not 0 <= self.cam_low <= self.cam_high <= 1:
            raise ConfigError("segment: need 0 <= cam_low <= cam_high <= 1")
        if self.soft_weight < 0:
            raise ConfigError("segment.soft_weight: must be >= 0")
        if self.cam_score not in ("auto", "instance_scores"):
            raise ConfigError("segment.cam_score: must be auto or instance_scores")
        if not 0 <= self.negative_quantile <= 1:
            raise ConfigError("segment.negative_quantile: must be in [0, 1] (0: off)")
        if not 0 <= self.cam_gate < 1:
            raise ConfigError("segment.cam_gate: must be in [0, 1) (0: off)")
        for name in ("epochs", "steps_per_epoch", "batch_size", "crop_px", "window_px"):
            if getattr(self, name) < 1:
                raise ConfigError(f"segment.{name}: must be >= 1")
        if self.correct_from_epoch < 0:
            raise ConfigError("segment.correct_from_epoch: must be >= 0 (0: no self-correction)")
        if not 0.5 < self.correct_confidence < 1:
            raise ConfigError("segment.correct_confidence: must be in (0.5, 1)")
        if not 0 < self.correct_blend <= 1:
            raise ConfigError("segment.correct_blend: must be in (0, 1]")
        if not 0 <= self.overlap < 1:
            raise ConfigError("segment.overlap: must be in [0, 1)")
        if not 0 < self.threshold < 1:
            raise ConfigError("segment.threshold: must be in (0, 1)")
        if self.min_lesion_area_um2 < 0:
            raise ConfigError("segment.min_lesion_area_um2: must be >= 0")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError("segment.device: must be auto, cpu, cuda or cuda:N")
        if any(not isinstance(k, str) for k in self.model_args):
            raise ConfigError("segment.model_args: keys must be argument names (strings)")


@dataclass(frozen=True)
class DetectConfig:
    # Training parameters (the library's object: wsi_pipeline.detection.params.DetectTrainParams):
    # detector, classes, work_mpp, sigma_um, crops, epochs, sampling mix, stain jitter, early stopping.
    train: DetectTrainParams = field(default_factory=DetectTrainParams)
    # Annotations: "" = the demo cohort's truth beside each slide ({stem}.nuclei.csv, .mitoses.csv);
    # else a folder holding {slide_id}.csv / .geojson / .json (point CSV, QuPath GeoJSON, MIDOG/COCO).
    annotations: str = ""
    # Annotation class names -> detector classes (e.g. {"mitotic figure": mitosis}); names to drop.
    class_map: dict = field(default_factory=dict)
    ignore_classes: list = field(default_factory=list)
    # Class counted for mitotic density and the hotspot ("" = none).
    mitosis_class: str = "mitosis"
    # Inference: core tile side (working px); the margin around each core is the largest object's
    # diameter, so neighbouring windows overlap by 2x the largest object.
    tile_px: int = 512
    max_object_um: float = 12.0
    # Peaks below min_score are not kept as candidates; peaks closer than nms_um are one object.
    min_score: float = 0.1
    nms_um: float = 2.0
    # The same for each rare class (train.rare_classes: mitoses), peaked on its own. A mitotic figure is
    # a scattered clump of chromatin that gives several maxima up to ~6 µm apart; within the MIDOG
    # match radius (7.5 µm) a second prediction can only be a false positive, and two mitoses that
    # close are very rare. Both radii must fit in the tile margin (<= max_object_um).
    rare_nms_um: float = 7.0
    # Density maps per slide ({slide}.{class}.density.png overlay + .tif pyramid, the heatmap stage's
    # exports and heatmap.colormap / alpha / png_max_px): kept objects per mm² of tissue, Gaussian
    # sigma in µm (194: a window whose area 2 pi sigma² is one 0.237 mm² high-power field). [] = none.
    density_classes: list = field(default_factory=lambda: ["mitosis"])
    density_sigma_um: float = 194.0
    # Score threshold per class for the outputs (missing classes: 0.5). eval-detect's choice on the
    # validation slides (RUN/detect/{model}/thresholds.json) takes precedence when present.
    thresholds: dict = field(default_factory=dict)
    # MIDOG matching radius (µm).
    match_radius_um: float = 7.5
    batch_size: int = 4
    # auto: cuda when available (bfloat16 autocast there), else cpu.
    device: str = "auto"

    def __post_init__(self):
        for name in ("tile_px", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"detect.{name}: must be >= 1")
        for name in ("max_object_um", "nms_um", "rare_nms_um", "match_radius_um"):
            _positive(f"detect.{name}", getattr(self, name))
        for name in ("nms_um", "rare_nms_um"):
            if getattr(self, name) > self.max_object_um:
                raise ConfigError(f"detect.{name}: must be <= detect.max_object_um (the tile margin), "
                                  f"else one object on a tile seam can be reported twice")
        if not 0 < self.min_score < 1:
            raise ConfigError("detect.min_score: must be in (0, 1)")
        if self.mitosis_class and self.mitosis_class not in self.train.classes:
            raise ConfigError(f"detect.mitosis_class: {self.mitosis_class!r} not in detect.train.classes")
        for c in self.density_classes:
            check_name(c, "detect.density_classes")   # it becomes part of a file name
            if c not in self.train.classes:
                raise ConfigError(f"detect.density_classes: {c!r} not in detect.train.classes")
        _positive("detect.density_sigma_um", self.density_sigma_um)
        for k, v in self.thresholds.items():
            if k not in self.train.classes or isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ConfigError(f"detect.thresholds: {k!r}: need a class of detect.train.classes and 0 < t < 1")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError("detect.device: must be auto, cpu, cuda or cuda:N")


# The CT window presets of wsi_pipeline/volumes/intensity.py (CT_WINDOWS), named here so that
# validating a config does not import the volumes package (torch); a test keeps the two equal.
CT_WINDOW_PRESETS = ("soft_tissue", "liver", "lung", "bone", "brain")


@dataclass(frozen=True)
class VolumesConfig:
    """Radiology volumes (manifest rows with modality CT/MR): how the tile stage cuts a volume into
    2.5-D instances (wsi_pipeline/volumes/instances.py) and how the heatmap stage explains it.
    The encoder is extract.encoder (any 2-D encoder sees each instance as one RGB image)."""
    # Isotropic voxel size the volume is resampled to before instances are cut (mm); null keeps
    # the file's own spacing (then the geometry must be given in voxels).
    target_spacing_mm: float | None = 1.5
    # Instance geometry in mm: in-plane box side and step, slab thickness (= its step) along the
    # axial axis. The voxel numbers are derived on the target grid (rounded) and recorded in
    # coords.h5 with these. 12 / 6 / 6 mm suits lesions of about 1 cm (a 1-2 cm lesion fills a box);
    # whole-organ labels can take larger boxes (e.g. 32 / 16 / 8).
    box_mm: float = 12.0
    stride_mm: float = 6.0
    slab_mm: float = 6.0
    # Optional second, coarser scale in the same bag: [box_mm, stride_mm, slab_mm] (null: none).
    # Each instance's scale is the coords.h5 dataset `scale`; heatmaps paint each with its own box.
    coarse_scale_mm: list | None = None
    # The geometry in voxels instead (all three, or none): overrides the mm keys when given.
    patch_size_vox: int | None = None
    stride_vox: int | None = None
    slice_step: int | None = None
    # CT windows in absolute HU, or relative to the scan (body_median: each window's centre moves by
    # the body's median HU - 40, so a calibration offset moves the windows with the scan).
    window_reference: str = "absolute"
    # windows: three CT windows of the slab's centre slice as RGB; slices: three neighbouring slices
    # in the first window. MR: the normalised slice(s).
    channels: str = "windows"
    # CT windows: preset names (soft_tissue, liver, lung, bone, brain) or [centre, width] HU pairs.
    windows: list = field(default_factory=lambda: ["soft_tissue", "liver", "bone"])
    # Keep a box when at least this fraction of its voxels is body (CT: HU above min_hu; MR: Otsu).
    min_body_fraction: float = 0.5
    min_hu: float = -500.0
    # MR intensities: percentile (1st-99th of the body -> [0, 1]) or zscore.
    mri_normalisation: str = "percentile"
    # Heatmap stage: Gaussian smoothing at half the instance lattice step, and the CAM mask
    # threshold (fraction of the volume's maximum heat).
    smooth: bool = True
    cam_threshold: float = 0.5

    def __post_init__(self):
        if self.target_spacing_mm is not None:
            _positive("volumes.target_spacing_mm", self.target_spacing_mm)
        for name in ("patch_size_vox", "stride_vox", "slice_step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"volumes.{name}: must be >= 1, got {value!r}")
        vox = [getattr(self, n) for n in ("patch_size_vox", "stride_vox", "slice_step")]
        if any(v is not None for v in vox) and any(v is None for v in vox):
            raise ConfigError("volumes.patch_size_vox, stride_vox, slice_step: give all three (voxel "
                              "geometry) or none (geometry from box_mm, stride_mm, slab_mm)")
        for name in ("box_mm", "stride_mm", "slab_mm"):
            _positive(f"volumes.{name}", getattr(self, name))
        if vox[0] is None and self.target_spacing_mm is None:
            raise ConfigError("volumes.box_mm: geometry in mm needs volumes.target_spacing_mm (null keeps "
                              "each file's spacing: give patch_size_vox, stride_vox, slice_step instead)")
        if self.coarse_scale_mm is not None:
            c = self.coarse_scale_mm
            if not (isinstance(c, list) and len(c) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                and v > 0 for v in c)):
                raise ConfigError(f"volumes.coarse_scale_mm: [box_mm, stride_mm, slab_mm] > 0 or null, got {c!r}")
            if self.target_spacing_mm is None:
                raise ConfigError("volumes.coarse_scale_mm: needs volumes.target_spacing_mm")
            if c[0] <= self.box_mm:
                raise ConfigError(f"volumes.coarse_scale_mm: its box ({c[0]} mm) must be larger than box_mm "
                                  f"({self.box_mm} mm)")
        if self.window_reference not in ("absolute", "body_median"):
            raise ConfigError(f"volumes.window_reference: must be absolute or body_median, got {self.window_reference!r}")
        if self.channels not in ("windows", "slices"):
            raise ConfigError(f"volumes.channels: must be windows or slices, got {self.channels!r}")
        if not self.windows:
            raise ConfigError("volumes.windows: need at least one window")
        for w in self.windows:
            if isinstance(w, str):
                if w not in CT_WINDOW_PRESETS:
                    raise ConfigError(f"volumes.windows: unknown preset {w!r}; known: {', '.join(CT_WINDOW_PRESETS)}")
            elif not (isinstance(w, list) and len(w) == 2
                      and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in w) and w[1] > 0):
                raise ConfigError(f"volumes.windows: each window is a preset name or [centre, width] HU "
                                  f"with width > 0, got {w!r}")
        if self.channels == "windows" and len(self.windows) != 3:
            raise ConfigError(f"volumes.windows: channels 'windows' needs exactly 3 windows (RGB), "
                              f"got {len(self.windows)}")
        if not 0 < self.min_body_fraction <= 1:
            raise ConfigError("volumes.min_body_fraction: must be in (0, 1]")
        if self.mri_normalisation not in ("percentile", "zscore"):
            raise ConfigError("volumes.mri_normalisation: must be percentile or zscore")
        if not 0 < self.cam_threshold < 1:
            raise ConfigError("volumes.cam_threshold: must be in (0, 1)")

    def instance_params(self):
        """The instance settings as `volumes.instances.VolumeInstanceParams`."""
        from ..volumes.instances import VolumeInstanceParams

        common = dict(
            channels=self.channels,
            windows=tuple(w if isinstance(w, str) else tuple(float(v) for v in w) for w in self.windows),
            min_body_fraction=self.min_body_fraction, min_hu=self.min_hu,
            mri_normalisation=self.mri_normalisation, window_reference=self.window_reference)
        if self.patch_size_vox is not None:
            return VolumeInstanceParams(
                target_spacing_mm=self.target_spacing_mm, patch_size_vox=self.patch_size_vox,
                stride_vox=self.stride_vox, slice_step=self.slice_step, **common)
        return VolumeInstanceParams.from_mm(
            self.target_spacing_mm, self.box_mm, self.stride_mm, self.slab_mm,
            coarse_mm=tuple(self.coarse_scale_mm) if self.coarse_scale_mm is not None else None, **common)


@dataclass(frozen=True)
class ClusterConfig:
    """How the workflow cuts its per-slide work into jobs (no output depends on it)."""
    # Slides per tile / extract / heatmap job: 1 = one job per slide and stage (the default); K > 1
    # = one job (one process, one cluster submission) runs K slides of one cohort in sequence, so a
    # 10,000-slide cohort queues ~3 x 10,000 / K jobs instead of ~30,000. Per-slide resume and
    # failure records stay per slide (workflow/rules/batches.smk).
    slides_per_job: int = 1

    def __post_init__(self):
        if isinstance(self.slides_per_job, bool) or not isinstance(self.slides_per_job, int) \
                or self.slides_per_job < 1:
            raise ConfigError(f"cluster.slides_per_job: must be an integer >= 1, got {self.slides_per_job!r}")


@dataclass(frozen=True)
class Config:
    slides: SlideConfig = field(default_factory=SlideConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    heatmap: HeatmapConfig = field(default_factory=HeatmapConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    volumes: VolumesConfig = field(default_factory=VolumesConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self):
        if self.tiling.is_auto():   # the encoder's tiling; hashed and recorded as numbers
            from ..encoders.fit import resolve_auto_tiling

            mpp, px = resolve_auto_tiling(self.tiling.target_mpp, self.tiling.patch_size_px, self.extract.encoder)
            object.__setattr__(self, "tiling", dataclasses.replace(self.tiling, target_mpp=mpp, patch_size_px=px))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Hash of the named sections: outputs record it, and a rerun redoes them when it changes.

        Keys marked `metadata={"hash": False}` (switches that never change an output, only whether
        a slide is allowed) are left out, so adding one keeps every existing output valid."""
        payload = {}
        for name in sections:
            section = getattr(self, name)
            values = dataclasses.asdict(section)
            payload[name] = {f.name: values[f.name] for f in dataclasses.fields(section)
                             if f.metadata.get("hash", True)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# Sanity limits: a patch resolution outside them is a typo (a dpi, nm, or a magnification), and a
# patch side above this would not fit an encoder's memory anyway.
_MPP_LIMITS = (0.01, 100.0)
_MAX_PATCH_PX = 8192


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}: must be > 0, got {value!r}")
    if value == float("inf"):
        raise ConfigError(f"{name}: must be finite, got {value!r}")


def load_config(path: str | Path | None) -> Config:
    """Read YAML at `path` (None: all defaults) into a validated `Config`."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return config_from_dict(raw or {}, source=str(path))


def config_from_dict(raw: dict, source: str = "config") -> Config:
    return _build(Config, raw, prefix="", source=source)


def _build(cls, raw, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)} "
                          f"(known in {where}: {', '.join(sorted(known))})")
    kwargs = {}
    for key, value in raw.items():
        kwargs[key] = _coerce(hints[key], value, prefix + key, source)
    return cls(**kwargs)


def _coerce(hint, value, key: str, source: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", source)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for simple in (bool, str):  # `bool | str` settings (train.center_per_slide) take either
            if simple in inner and type(value) is simple and len(inner) > 1:
                return value
        return _coerce(inner[0], value, key, source)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return list(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    return value


def save_resolved_config(cfg: Config, run_dir: str | Path, stage: str | None = None) -> Path:
    """Write the config actually used (with its hash), atomically: RUN/config.yaml, or with `stage`
    RUN/configs/{stage}.yaml (each stage's own record, overrides included: parallel jobs of one stage
    write the same text, and jobs of different stages never write the same file)."""
    from ..io import write_text_atomic  # local: io is a leaf module, config stays import-light
    from .names import check_name

    payload = cfg.to_dict()
    full_hash = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    text = f"# resolved wsi-pipeline config; hash {full_hash}\n" + yaml.safe_dump(payload, sort_keys=False)
    path = Path(run_dir) / "config.yaml"
    if stage is not None:
        path = Path(run_dir) / "configs" / f"{check_name(stage, 'stage')}.yaml"
    write_text_atomic(path, text)
    return path
