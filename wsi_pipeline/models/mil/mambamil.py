"""MambaMIL (Yang et al., MICCAI 2024; github isyangshu/MambaMIL): Mamba layers over the bag.

    h  = dropout(GELU(Linear(in_dim → d_model)))(x)           (B, L, d_model)
    h  = h + mixer(LayerNorm(h))                               × n_layers
    h  = LayerNorm(h)                                          (final_norm; Identity if False)
    A  = softmax_i(w · tanh(V h_i))                            (B, L)  attention, d_model → 128 → 1
    logits = Linear(Σ_i A_i h_i)                               (B, C)

Registered mixers (one in_proj/out_proj per layer, separate SSM parameters per scan branch):
- ``"mambamil"``: SRMamba = forward scan + a scan of the sequence re-ordered with stride ``rate``
  (zero-padded to a multiple of ``rate``), branch outputs put back in order and summed.
- ``"bimamba_mil"``: forward + reversed scan.
- ``"mamba_mil"``: one forward scan (a plain Mamba block).

As in the reference, the attention pooling is ungated (Linear, Tanh, Linear), dropout is applied
only after the input projection, and there is no positional information other than the order of
the sequence.

Order-dependent: the scans read instances in the order given, so a shuffled bag gives different
logits. The reference feeds patches in their features-file order (no sorting); our features.h5
order is the tiling order, so train and infer with the same order. With ``scan="bag"`` (default,
the reference) ``coords`` are ignored. With ``scan`` a :class:`~wsi_pipeline.ssm.Raster3D`
direction (``"zyx"``, ``"yxz"`` = SegMamba's inter-slice scan, ...), the layers read the instances
in that 3-D raster order of their coordinates (:mod:`.coord_scan`; slides are depth-1 volumes),
whatever the bag order; ``mambamil_3d`` registers that with ``"zyx"`` for volumes (coords (L, 3)).
``instance_scores`` is the attention A (rows sum to 1). B > 1 works for bags of equal length.

``init``: ``"mamba"`` (default) keeps Mamba's own init; ``"reference"`` reproduces the reference
repo (Xavier-normal weights and zero biases on every Linear, dt_proj included); see
:func:`~wsi_pipeline.models.mil.mil_layers.init_weights`.

Context branch (``layer_scale``, ``context_drop``; :class:`~.mil_layers.PreNormResidual`): each
Mamba layer's branch is skipped, per bag and training pass, with probability ``context_drop``
(default 0.5; eval always uses it), so the instance-wise path alone must classify the bag on those
passes. Without it, on 48 slides with lesions of 1-4 patches, the mixer memorised the training
slides (validation loss rising from epoch 1-3) before the attention found the lesions; the
measurements are in benchmarks/results/mil_hard.md. ``context_drop=0`` is the reference design.

``checkpoint_above`` (None: off): for bags longer than this, each layer and each scan branch
recomputes its activations in backward instead of keeping them (``torch.utils.checkpoint``): same
gradients, about one more forward pass of the mixers in time, and peak memory that no longer holds
every layer's activations at once (benchmarks/results/scan_fused.md). ``checkpoint_chunk`` (None:
off) adds sequence-chunked recompute for those bags: each layer is recomputed in pieces of that
many instances, the scan state and conv inputs carried across pieces, so one layer's whole-bag
activations are never held either (:class:`~.mil_layers.PreNormResidual`). With
``checkpoint_above=0, checkpoint_chunk=2048`` a d_model-512 MambaMIL's training pass rises by 18-20
KiB per instance in fp32 (CPU, 10k-100k; a 1M bag ~19 GiB plus the 4 GiB bag itself), against 124
KiB without checkpointing and 59 with layer checkpointing; one piece's recompute adds ~90 KiB per
piece step, a constant (benchmarks/results/scan_round2.md). It costs about 1.4x the time of a plain
pass on CPU, as layer checkpointing does. The pieces use the native scan (mamba-ssm's kernel
cannot start from a carried state), so on a GPU this trades much more time for memory.

Instance head (``instance_head``, default False = the reference): True also returns
``instance_logits`` (B, L, C) = head(h_i), whose attention-weighted sum is exactly the slide logits
(affine head, attention summing to 1), so the trainer's instance top-k loss
(``train.instance_loss_weight``) applies, as it does for FMaMIL: on volumes, where a lesion is a few
boxes among thousands, it asks the per-instance scores themselves to single the lesion out.
``instance_score="cam"`` (needs the head) makes ``instance_scores`` the min-max normalised CAM of the
last class instead of the attention.

Final LayerNorm (``final_norm``, default True = the reference): ``final_norm=False`` feeds the
attention and the head the residual stream as it is. On the hard demo (centred, standardised
features; lesions of 1-4 patches) the per-instance LayerNorm made MambaMIL memorise the training
slides; without it the attention finds the lesions (benchmarks/results/mil_hard.md).
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_pipeline.ssm import Raster3D

from .coord_scan import coords_scan_permutation
from .mil_layers import PreNormResidual, TanhAttentionPool, build_mixer, init_weights
from .registry import IGNORES_COORDS, MILOutput, check_coord_dims, register_aggregator

LICENSE = "Apache-2.0"  # this implementation (written here from the paper); no weights are shipped
SCANS = ("bag",) + Raster3D.DIRECTIONS
REFERENCE = "Yang et al., MICCAI 2024 (MambaMIL); github.com/isyangshu/MambaMIL"


class MambaMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, mixer: str = "srmamba", d_model: int = 512,
                 n_layers: int = 2, rate: int = 10, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dropout: float = 0.25, attention_dim: int = 128, init: str = "mamba", scan: str = "bag",
                 layer_scale: float | None = None, context_drop: float = 0.5,
                 checkpoint_above: int | None = None, final_norm: bool = True,
                 checkpoint_chunk: int | None = None, instance_head: bool = False,
                 instance_score: str = "attention"):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if instance_score not in ("attention", "cam"):
            raise ValueError(f"instance_score must be attention or cam, got {instance_score!r}")
        if instance_score == "cam" and not instance_head:
            raise ValueError("instance_score='cam' needs instance_head=True")
        self.instance_head, self.instance_score = instance_head, instance_score
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
        self.scan = scan
        self.embed = nn.Sequential(nn.Linear(in_dim, d_model), nn.GELU(), nn.Dropout(dropout))
        self.layers = nn.ModuleList(
            PreNormResidual(d_model, build_mixer(mixer, d_model, rate, d_state, d_conv, expand, checkpoint_above),
                            layer_scale, context_drop, checkpoint_above, checkpoint_chunk)
            for _ in range(n_layers)
        )
        # final_norm=False: no LayerNorm before the attention (module docstring, "Final LayerNorm").
        self.norm = nn.LayerNorm(d_model) if final_norm else nn.Identity()
        self.attention = TanhAttentionPool(d_model, attention_dim)
        self.head = nn.Linear(d_model, n_classes)
        init_weights(self, init)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        """features (B, L, D), coords (B, L, k) or None → logits (B, C); instance_scores (B, L)
        attention (in bag order). coords are read only when ``scan`` is a raster direction."""
        h = self.embed(features)
        order = None
        if self.scan != "bag" and coords is not None:
            check_coord_dims(coords, (2, 3), f"MambaMIL(scan={self.scan!r})")
            order = torch.stack([coords_scan_permutation(c, self.scan) for c in coords]).to(h.device)
            h = h.gather(1, order[..., None].expand(-1, -1, h.shape[-1]))
        for layer in self.layers:
            h = layer(h)
        if order is not None:   # back to bag order, so instance_scores line up with the bag
            h = h.gather(1, torch.argsort(order, dim=1)[..., None].expand(-1, -1, h.shape[-1]))
        h = self.norm(h)
        bag_embedding, attention = self.attention(h)
        if not self.instance_head:
            return MILOutput(logits=self.head(bag_embedding), instance_scores=attention)
        # The head is affine and the attention sums to 1, so head(Σ A h) = Σ A head(h): the
        # instance logits are the slide logits' own per-instance terms (module docstring).
        instance_logits = self.head(h)                                          # (B, L, C)
        scores = attention
        if self.instance_score == "cam":
            cam = instance_logits[..., -1]
            low, high = cam.amin(dim=1, keepdim=True), cam.amax(dim=1, keepdim=True)
            scores = (cam - low) / (high - low).clamp(min=1e-12)
        return MILOutput(logits=self.head(bag_embedding), instance_scores=scores, instance_logits=instance_logits)


@register_aggregator("mambamil", **IGNORES_COORDS, license=LICENSE, reference=REFERENCE)
def mambamil(in_dim: int, n_classes: int, **cfg) -> MambaMIL:
    return MambaMIL(in_dim, n_classes, mixer="srmamba", **cfg)


@register_aggregator("bimamba_mil", **IGNORES_COORDS, license=LICENSE, reference=REFERENCE)
def bimamba_mil(in_dim: int, n_classes: int, **cfg) -> MambaMIL:
    return MambaMIL(in_dim, n_classes, mixer="bimamba", **cfg)


@register_aggregator("mamba_mil", **IGNORES_COORDS, license=LICENSE, reference=REFERENCE)
def mamba_mil(in_dim: int, n_classes: int, **cfg) -> MambaMIL:
    return MambaMIL(in_dim, n_classes, mixer="mamba", **cfg)


# SRMamba over the instances in 3-D raster order (slice by slice, row by row) of their coordinates;
# for volumes (k = 3), and for slides (k = 2: a depth-1 volume, i.e. row-major over the tissue).
@register_aggregator("mambamil_3d", coord_dims=(2, 3), uses_coords=True, out_dim="n_classes", license=LICENSE,
                     reference=REFERENCE + "; scan orders: SegMamba (Xing et al., MICCAI 2024)")
def mambamil_3d(in_dim: int, n_classes: int, **cfg) -> MambaMIL:
    return MambaMIL(in_dim, n_classes, mixer="srmamba", **{"scan": "zyx", **cfg})
