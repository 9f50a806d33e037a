"""FMaMIL stage 1 (Cheng et al. 2025, arXiv 2506.07652): Mamba MIL with a learnable frequency-domain
encoding, producing per-class instance CAMs.

Only the first (MIL / CAM) stage is modelled here; the paper's second stage (CAM-guided segmentation
with soft labels and self-correction) is outside the aggregator. The paper gives the structure, not
every detail; our choices are documented below.

    h   = dropout(GELU(Linear(in_dim → d_model)))(x)                 (L, d)
    grid: instances on the slide's patch grid (:mod:`.patch_grid`; near-square raster without coords)
    h   = h + gather(irfft2(W ⊙ rfft2(scatter(h))))                  learnable frequency encoding
    h   = h + mixer(LayerNorm(h))  × n_layers, over the instances in grid raster order
    h   = LayerNorm(h)                                               (final_norm; Identity if False)
    instance_logits = Linear(h)                                      (B, L, C) class activation maps
    A   = softmax_i(w · tanh(V h_i))                                 (B, L)
    logits = Σ_i A_i · instance_logits_i                             (B, C) attention-weighted CAM pooling

- Frequency encoding: ``W`` is a complex filter per channel, stored at a fixed size
  (``filter_size`` × ``filter_size // 2 + 1``, the rfft2 half-spectrum of a filter_size² grid) and
  bilinearly interpolated (align_corners) to each slide's frequency grid (H, W // 2 + 1); FFTs use the
  orthonormal norm, so a filter of ones is the identity. The grid is not zero-padded: the filter acts
  as a circular convolution over the slide (as in global-filter networks). ``filter_init="small"``
  (default) starts W ~ N(0, 0.02²) so the encoding starts as a small perturbation; ``"identity"``
  starts at W = 1 (the frequency branch then returns the features unchanged, the encoding doubles them).
  Grids of more than ``max_grid_factor · L + 4096`` cells are coarsened (very sparse tissue).
- Scan order: with coordinates the Mamba layers read the instances in grid raster order (row by row),
  so the encoder follows the slide layout and does not depend on the order of the bag; without
  coordinates the bag order is the raster order.
- Slide logits pool the CAMs with attention weights (not top-k), so every instance gets a gradient
  and, since the head is affine and the weights sum to 1, the logits equal the head of the attention
  pooled embedding.
- ``instance_scores`` (B, L), what heatmaps show (``instance_score``): ``"attention"`` (default)
  the attention weights A, as for abmil and mambamil; ``"cam"`` the CAM of the last class (the
  positive class for binary tasks), min–max normalised per bag to [0, 1] (no softmax; a bag whose
  CAM is constant scores 0). The raw CAMs are always ``instance_logits`` (the segment stage's
  per-patch probabilities come from them). Why attention by default: on the hard demo (lesions of
  1-4 patches among confounders) the model that separates the slides best (CV AUC 0.95) ranks
  lesion patches by attention (top decile 0.98 of a perfect map) but not by its CAM (0.06); the CAM
  localises only when trained to (``train.instance_loss_weight``), at a cost in AUC
  (benchmarks/results/mil_hard.md).

B > 1 works (bags of equal length, each with its own grid).

Context branch (``layer_scale``, ``context_drop``, default 0.5): as in
:mod:`~wsi_pipeline.models.mil.mambamil`, whose docstring says why; ``context_drop=0`` is the
reference design. ``checkpoint_above`` (None: off): activation checkpointing of the Mamba
layers for bags longer than this, as in MambaMIL; ``checkpoint_chunk`` (None: off) recomputes them
in pieces of that many instances, as in MambaMIL.

Final LayerNorm (``final_norm``, default True = the paper's structure): ``False`` feeds the CAM head
and the attention the residual stream as it is, as MambaMIL's option of the same name (whose
docstring says why: a per-instance LayerNorm rescales away how far a centred lesion patch is from its
slide).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mil_layers import PreNormResidual, TanhAttentionPool, build_mixer, init_weights
from .patch_grid import PatchGrid, gather_from_grid, grid_from_coords, raster_grid, scatter_to_grid
from .registry import MILOutput, check_coord_dims, register_aggregator

LICENSE = "Apache-2.0"  # this implementation (written here from the paper); no weights are shipped

FILTER_INITS = ("small", "identity")
INSTANCE_SCORES = ("attention", "cam")


class SpectralFilter2d(nn.Module):
    """Learnable complex per-channel filter on the rfft2 spectrum: (d, H, W) → (d, H, W)."""

    def __init__(self, channels: int, filter_size: int = 32, init: str = "small"):
        super().__init__()
        if init not in FILTER_INITS:
            raise ValueError(f"filter_init must be one of {FILTER_INITS}, got {init!r}")
        shape = (channels, filter_size, filter_size // 2 + 1, 2)     # (..., real/imag)
        if init == "identity":
            weight = torch.zeros(shape)
            weight[..., 0] = 1.0
        else:
            weight = torch.randn(shape) * 0.02
        self.weight = nn.Parameter(weight)

    def complex_weight(self, height: int, freq_width: int) -> torch.Tensor:
        """The filter resized to a (height, freq_width) half-spectrum: complex (d, height, freq_width)."""
        weight = self.weight
        channels = weight.shape[0]
        if weight.shape[1:3] != (height, freq_width):
            planes = weight.permute(0, 3, 1, 2).reshape(1, channels * 2, *weight.shape[1:3])
            planes = F.interpolate(planes, size=(height, freq_width), mode="bilinear", align_corners=True)
            weight = planes.reshape(channels, 2, height, freq_width).permute(0, 2, 3, 1)
        return torch.view_as_complex(weight.contiguous())

    def forward(self, grid_values: torch.Tensor) -> torch.Tensor:
        height, width = grid_values.shape[-2:]
        spectrum = torch.fft.rfft2(grid_values.float(), norm="ortho")               # (d, H, W//2+1)
        spectrum = spectrum * self.complex_weight(height, spectrum.shape[-1])
        return torch.fft.irfft2(spectrum, s=(height, width), norm="ortho").to(grid_values.dtype)


class FrequencyEncoding(nn.Module):
    """x + gather(filter(scatter(x))): instance features supplemented by their filtered grid, (L, d) → (L, d)."""

    def __init__(self, channels: int, filter_size: int = 32, filter_init: str = "small"):
        super().__init__()
        self.filter = SpectralFilter2d(channels, filter_size, filter_init)

    def spectral(self, x: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
        """The frequency branch alone: (L, d) → (L, d)."""
        return gather_from_grid(self.filter(scatter_to_grid(x, grid)), grid)

    def forward(self, x: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
        return x + self.spectral(x, grid)


class FMaMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, d_model: int = 256, n_layers: int = 2, mixer: str = "bimamba",
                 rate: int = 10, d_state: int = 16, d_conv: int = 4, expand: float = 2, dropout: float = 0.25,
                 filter_size: int = 32, filter_init: str = "small", max_grid_factor: int = 16,
                 attention_dim: int = 128, init: str = "mamba",
                 layer_scale: float | None = None, context_drop: float = 0.5, instance_score: str = "attention",
                 checkpoint_above: int | None = None, checkpoint_chunk: int | None = None,
                 final_norm: bool = True):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if instance_score not in INSTANCE_SCORES:
            raise ValueError(f"instance_score must be one of {INSTANCE_SCORES}, got {instance_score!r}")
        self.instance_score = instance_score
        self.max_grid_factor = max_grid_factor
        self.embed = nn.Sequential(nn.Linear(in_dim, d_model), nn.GELU(), nn.Dropout(dropout))
        self.frequency = FrequencyEncoding(d_model, filter_size, filter_init)
        self.layers = nn.ModuleList(
            PreNormResidual(d_model, build_mixer(mixer, d_model, rate, d_state, d_conv, expand, checkpoint_above),
                            layer_scale, context_drop, checkpoint_above, checkpoint_chunk)
            for _ in range(n_layers)
        )
        # final_norm=False: no per-instance LayerNorm before the CAM head and the attention (module
        # docstring, "Final LayerNorm").
        self.norm = nn.LayerNorm(d_model) if final_norm else nn.Identity()
        self.attention = TanhAttentionPool(d_model, attention_dim)
        self.cam_head = nn.Linear(d_model, n_classes)
        init_weights(self, init)

    def grid(self, n_instances: int, coords: torch.Tensor | None, device) -> PatchGrid:
        """Grid of one bag: coords (L, 2) or None."""
        if coords is None:
            return raster_grid(n_instances, device)
        return grid_from_coords(coords, max_cells=self.max_grid_factor * n_instances + 4096)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        """features (B, L, D), coords (B, L, 2) level-0 px or None → logits (B, C), instance_logits
        (B, L, C) CAMs, instance_scores (B, L): attention, or the min–max normalised CAM of the
        last class (``instance_score``).
        Volume coords (B, L, 3) are refused: the frequency encoding is a 2-D grid filter."""
        check_coord_dims(coords, (2,), "fmamil")
        h = self.embed(features)
        n_instances = h.shape[1]
        encoded, orders = [], []
        for b in range(h.shape[0]):
            grid = self.grid(n_instances, None if coords is None else coords[b], h.device)
            encoded.append(self.frequency(h[b], grid))
            orders.append(torch.argsort(grid.cells.to(h.device), stable=True))
        order = torch.stack(orders)                                            # (B, L) raster order
        width = h.shape[-1]
        h = torch.stack(encoded).gather(1, order[..., None].expand(-1, -1, width))
        for layer in self.layers:
            h = layer(h)
        restore = torch.argsort(order, dim=1)                                  # back to bag order
        h = h.gather(1, restore[..., None].expand(-1, -1, width))
        h = self.norm(h)
        instance_logits = self.cam_head(h)                                     # (B, L, C)
        _, attention = self.attention(h)
        logits = torch.einsum("bl,blc->bc", attention, instance_logits)
        if self.instance_score == "attention":
            instance_scores = attention
        else:
            cam = instance_logits[..., -1]
            low, high = cam.amin(dim=1, keepdim=True), cam.amax(dim=1, keepdim=True)
            instance_scores = (cam - low) / (high - low).clamp(min=1e-12)
        return MILOutput(logits=logits, instance_scores=instance_scores, instance_logits=instance_logits)


# The frequency encoding lays instances on a 2-D grid (x, y): a third axis would be ignored, so k = 2 only.
@register_aggregator("fmamil", coord_dims=(2,), uses_coords=True, out_dim="n_classes", license=LICENSE,
                     reference="Cheng et al. 2025, FMaMIL stage 1, arXiv:2506.07652")
def fmamil(in_dim: int, n_classes: int, **cfg) -> FMaMIL:
    return FMaMIL(in_dim, n_classes, **cfg)
