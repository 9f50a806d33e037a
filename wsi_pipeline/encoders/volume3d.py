"""Sub-volume (3-D) encoders for CT/MR instances: the same registry and `create_encoder` as the
slide encoders, with `input_dims=3` (wsi_pipeline/volumes/instances.py feeds them (B, C, D, H, W)
float sub-volumes in [0, 1]: the instance box with half its size of context on every side).

    volume_texture_3d    parameter-free intensity / texture descriptor, the offline default
    monai_resnet10_3d    MONAI's 3-D ResNet-10 (MedicalNet layout: shortcut B, no downsample
                         bias), the 512-d pooled trunk, weights from a local file

A radiology foundation model plugs in the same way: an `EncoderSpec` with `input_dims=3`, its
channel count as len(mean), and `min_input_px`.

`volume_texture_3d`, per channel (the CT windows of `volumes.windows`; values in window units), on
the central box B (the instance) and the context shell S around it (the rest of the input):
  first order  mean, std, 10/50/90th percentile, min, max of B                       7
  context      mean, std, median of S; mean(B) - mean(S), mean(B) - median(S),
               mean(core) - mean(B) with core the central half of B (a focal blob
               is brighter or darker at its centre than at the box's edge), and the
               magnitudes of the last three (hypo- and hyperdense alike)               9
  texture      mean gradient magnitude and mean |Laplacian| (3-D central differences)
               in B, and log of the std of 2-voxel block means in B (structure
               beyond the voxel noise)                                                  3
19 per channel (57 for three windows). Why context: a lesion is a focal difference from the organ
around it, and lesions in different organs span the same HU as other normal organs, so the box
alone cannot tell a hyperdense kidney lesion from liver; its contrast with its own surroundings can.
No weights, deterministic, cheap on a CPU; not a substitute for a trained 3-D network.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import EncoderSpec, register_encoder

VOLUME_TEXTURE_PER_CHANNEL = 19
VOLUME_TEXTURE_CHANNELS = 3
_EPS = 1e-6


def _split_box(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C, D, H, W) input → (box mask, core mask, shell mask) as bool (D, H, W): the box is the
    central half along each axis, the core the central half of the box."""
    masks = []
    for fraction in (0.5, 0.25):
        axes = []
        for n in x.shape[2:]:
            side = max(1, int(round(n * fraction)))
            start = (n - side) // 2
            keep = torch.zeros(n, dtype=torch.bool, device=x.device)
            keep[start:start + side] = True
            axes.append(keep)
        masks.append(axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :])
    box, core = masks
    return box, core & box, ~box


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C, n) values of x (B, C, D, H, W) where `mask` (D, H, W) holds."""
    return x[..., mask]


class VolumeTextureFeatures(nn.Module):
    """(B, C, D, H, W) in window units → (B, 19·C) descriptors (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        b, c = x.shape[:2]
        box, core, shell = _split_box(x)
        inner = _masked(x, box)                                          # (B, C, n_box)
        ring = _masked(x, shell) if shell.any() else inner
        centre = _masked(x, core)
        q = torch.quantile(inner, torch.tensor([0.1, 0.5, 0.9], device=x.device), dim=-1)  # (3, B, C)
        mean_b, mean_s, median_s = inner.mean(-1), ring.mean(-1), ring.median(-1).values
        # 3-D central differences (replicate edges) over the whole input, read inside the box.
        padded = nn.functional.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
        grads = [(padded.narrow(axis, 2, n) - padded.narrow(axis, 0, n)) / 2.0
                 for axis, n in zip((2, 3, 4), x.shape[2:])]
        grads = [g.narrow(a1, 1, n1).narrow(a2, 1, n2) for g, (a1, n1, a2, n2) in
                 zip(grads, [(3, x.shape[3], 4, x.shape[4]), (2, x.shape[2], 4, x.shape[4]),
                             (2, x.shape[2], 3, x.shape[3])])]
        magnitude = torch.sqrt(sum(g * g for g in grads) + _EPS ** 2)
        centre_pad = padded[:, :, 1:-1, 1:-1, 1:-1]
        laplacian = (padded[:, :, 2:, 1:-1, 1:-1] + padded[:, :, :-2, 1:-1, 1:-1] + padded[:, :, 1:-1, 2:, 1:-1]
                     + padded[:, :, 1:-1, :-2, 1:-1] + padded[:, :, 1:-1, 1:-1, 2:] + padded[:, :, 1:-1, 1:-1, :-2]
                     - 6.0 * centre_pad)
        # 2-voxel block means of the box (a box side of 1 keeps the voxel itself).
        box_idx = [torch.nonzero(box.any(dim=tuple(d for d in range(3) if d != a))).flatten() for a in range(3)]
        cube = x[:, :, box_idx[0]][:, :, :, box_idx[1]][:, :, :, :, box_idx[2]]
        kernel = tuple(min(2, n) for n in cube.shape[2:])
        blocks = nn.functional.avg_pool3d(cube, kernel).flatten(2)
        block_std = blocks.std(-1, unbiased=False) if blocks.shape[-1] > 1 else torch.zeros_like(mean_b)
        feats = [mean_b, inner.std(-1, unbiased=False), q[0], q[1], q[2], inner.amin(-1), inner.amax(-1),
                 mean_s, ring.std(-1, unbiased=False), median_s, mean_b - mean_s, mean_b - median_s,
                 centre.mean(-1) - mean_b,
                 # Magnitudes too: hypo- and hyperdense lesions differ from their context in either sign.
                 (mean_b - mean_s).abs(), (mean_b - median_s).abs(), (centre.mean(-1) - mean_b).abs(),
                 _masked(magnitude, box).mean(-1), _masked(laplacian.abs(), box).mean(-1),
                 torch.log(block_std + 1e-3)]
        out = torch.stack(feats, dim=-1)                                 # (B, C, 19)
        return out.reshape(b, c * VOLUME_TEXTURE_PER_CHANNEL)


register_encoder(EncoderSpec(
    name="volume_texture_3d", build=VolumeTextureFeatures,
    out_dim=VOLUME_TEXTURE_PER_CHANNEL * VOLUME_TEXTURE_CHANNELS,
    # Window units as they come: Encoder.normalise subtracts 0 and divides by 1.
    mean=(0.0,) * VOLUME_TEXTURE_CHANNELS, std=(1.0,) * VOLUME_TEXTURE_CHANNELS, parameter_free=True,
    # input_size_px: the default geometry's input side (8-voxel box + context); fed at its own size.
    input_dims=3, min_input_px=2, input_size_px=16,  # min: box side, voxels
    notes="3-D intensity, context-contrast and texture descriptors of a CT/MR instance, no weights "
          "(checkpoint: none); the offline volume demo's encoder",
    license="Apache-2.0", weights_license="none (no weights)", reference="this project"))


def _monai_resnet10(**overrides) -> nn.Module:
    """MONAI's ResNet-10 for 3-D single-channel input, no classification head (512-d pooled trunk),
    in the MedicalNet layout its `resnet10(pretrained=True)` loads: shortcut B, no downsample bias."""
    import sys

    if torch.get_default_device().type == "meta" and "monai" not in sys.modules:
        # The checkpoint search (weights.meta_shapes, naming which entry a wrong file fits) builds
        # every entry on the meta device; importing MONAI only for that costs ~10-20 s, so the
        # entry joins the search once MONAI is loaded (the search skips builds that raise).
        raise RuntimeError("MONAI not imported: left out of the checkpoint search")
    try:
        from monai.networks.nets import resnet10
    except ImportError:  # optional, as MONAI's own optional imports
        from ..errors import PipelineError

        raise PipelineError("encoder 'monai_resnet10_3d' needs MONAI: pip install 'wsi-pipeline[volumes]'") from None
    args = {"spatial_dims": 3, "n_input_channels": 1, "shortcut_type": "B", "bias_downsample": False,
            "feed_forward": False, **overrides}
    return resnet10(**args)


def _medicalnet_keys(state: dict) -> dict:
    """MedicalNet / DataParallel releases prefix every key with `module.`; their segmentation heads
    (`conv_seg.*`) are not part of the trunk."""
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if not key.startswith("conv_seg.") and not key.startswith("fc."):
            out[key] = value
    return out


register_encoder(EncoderSpec(
    name="monai_resnet10_3d", build=_monai_resnet10, out_dim=512,
    # One channel: the first CT window of volumes.windows (instances.py), as [0, 1]; MedicalNet
    # normalised each scan to zero mean / unit std, which (x - 0.5) / 0.25 approximates in a window.
    mean=(0.5,), std=(0.25,), input_dims=3, min_input_px=4, input_size_px=16,  # box 4: input 8, pooled to 1
    convert_state_dict=_medicalnet_keys,
    notes="MONAI ResNet-10 3-D trunk (global average pooled, 512-d); weights from a local file, e.g. "
          "MedicalNet's resnet_10_23dataset.pth re-saved as safetensors, or MONAI's own state_dict",
    license="Apache-2.0 (MONAI)", weights_license="as the checkpoint's (MedicalNet: MIT)",
    reference="MONAI monai.networks.nets.ResNet; Chen et al. 2019, Med3D / MedicalNet"))
