"""Detector training parameters: the `detect.train` config section is this object (no copies).
Torch-free, so the config module can import it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..run.names import check_name


@dataclass(frozen=True)
class DetectTrainParams:
    # Registered detector (wsi_pipeline.models.detect): mamba_centernet_tiny (CPU), mamba_centernet_small (GPU).
    detector: str = "mamba_centernet_tiny"
    # Extra keyword arguments for the detector (e.g. {dims: [16, 32, 64]}).
    model_args: dict = field(default_factory=dict)
    # Object classes, in heatmap-channel order; annotations must use these names.
    classes: list = field(default_factory=lambda: ["nucleus-normal", "nucleus-tumour", "mitosis"])
    # Classes whose objects training crops are centred on (rare: mitoses); hard negatives are mined for them.
    rare_classes: list = field(default_factory=lambda: ["mitosis"])
    # Resolution (µm/px) the detector trains and predicts at.
    work_mpp: float = 0.5
    # Sigma of the Gaussian centre targets, in µm (the same tissue at any resolution).
    sigma_um: float = 2.0
    # Training crop side in working pixels, crops per batch, epochs x steps, validation crops.
    crop_px: int = 128
    batch_size: int = 8
    epochs: int = 20
    steps_per_epoch: int = 30
    val_crops: int = 32
    lr: float = 2.0e-3
    offset_weight: float = 1.0
    # Batch mix: crops centred on rare objects, on mined hard negatives; the rest on random tissue.
    rare_fraction: float = 0.3
    hard_negative_fraction: float = 0.15
    # HED (optical-density) stain jitter: scale U(1 +- stain_sigma), shift U(+- stain_bias) per stain.
    stain_sigma: float = 0.05
    stain_bias: float = 0.02
    # Early stopping: epochs without a better validation loss.
    patience: int = 4
    # Fraction of patients held out for validation (patient-level split) unless slides are named.
    val_fraction: float = 0.25
    # Wall-clock budget in minutes (0: none): training stops after the epoch that reaches it, and the
    # cosine learning-rate schedule follows the clock when it runs out before the epochs do.
    time_limit_min: float = 0.0
    seed: int = 0
    device: str = "cpu"
    # Fine-tuning: a detector checkpoint folder (model.safetensors + config.json) whose weights start
    # training, e.g. to adapt a trained detector to stronger stain augmentation or a new lab; its
    # detector, model_args and classes must equal these. "" = random initialisation. Its training and
    # validation slides are recorded, and eval-detect refuses them as test slides too.
    init_from: str = ""

    def __post_init__(self):
        check_name(self.detector, "detect.train.detector")
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ConfigError(f"detect.train.classes: need distinct class names, got {self.classes!r}")
        unknown = sorted(set(self.rare_classes) - set(self.classes))
        if unknown:
            raise ConfigError(f"detect.train.rare_classes: {unknown} not in classes {self.classes}")
        for name in ("work_mpp", "sigma_um", "lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"detect.train.{name}: must be > 0")
        for name in ("crop_px", "batch_size", "epochs", "steps_per_epoch", "val_crops", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"detect.train.{name}: must be >= 1")
        if not (0 <= self.rare_fraction and 0 <= self.hard_negative_fraction
                and self.rare_fraction + self.hard_negative_fraction <= 1):
            raise ConfigError("detect.train: rare_fraction + hard_negative_fraction must be in [0, 1]")
        if not 0 < self.val_fraction < 1:
            raise ConfigError("detect.train.val_fraction: must be in (0, 1)")
