"""VM-UNet-style Mamba encoder-decoder (Ruan & Xiang 2024, VM-UNet), sized for CPU by default.

    image (B, C_in, H, W), H and W any size (padded to a multiple of `stride_multiple`, cropped back)
      -> PatchEmbed: Conv2d(kernel = stride = patch_size) -> LayerNorm           (B, H/p, W/p, dims[0])
      -> encoder stage i: depths[i] x VSSBlock; PatchMerging (2x2 -> dims[i+1]) between stages
      -> decoder stage i, deepest first: PatchExpand (x2, dims[i+1] -> dims[i]) + encoder skip (added)
         -> depths[i] x VSSBlock
      -> FinalExpand (x patch_size) -> LayerNorm -> Conv1x1 -> logits (B, out_channels, H, W)

    VSSBlock:  x + SS2D(LayerNorm(x))                                            (B, h, w, C)
    SS2D:      in_proj -> (x, z);  x -> depthwise 3x3 conv;
               for each of the four SS2D scan orders (rows, columns, both reversed:
               `ssm.ss2d_orders`) an `SSMBranch` with its own x_proj / dt_proj / A / D (VM-UNet's
               K = 4 parameter groups) scans the flattened map; the outputs are put back in raster
               order and summed -> LayerNorm -> x SiLU(z) -> out_proj.

Choices where this differs from VM-UNet or fills in what it leaves open:
- VM-UNet applies SiLU after the depthwise conv and then scans. `SSMBranch` (the SSM core's unit)
  starts with a depthwise causal conv along the scan followed by SiLU; with `scan_conv=1` (default)
  that conv is one tap per channel initialised to 1 and bias 0, so each branch computes
  scan(SiLU(conv3x3(x))) at initialisation, VM-UNet's order, with a learnable per-channel scale.
  `scan_conv > 1` adds a short causal conv along every scan direction.
- Skips are added (VM-UNet's choice), not concatenated.
- Sizes: the input is padded by edge replication to a multiple of
  patch_size * 2^(n_stages - 1) and the logits are cropped back, so any H, W >= 1 works.
- Inputs: float images normalised with `input_mean` / `input_std` (attributes the caller reads,
  like timm's pretrained_cfg); the default (0.5, 0.25) maps uint8/255 to about [-2, 2].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.ssm import SSMBranch, ss2d_orders

from .registry import register_segmenter

# Any H, W >= 1 (padded internally); 4x4 patch embedding as in VM-UNet. No weights are shipped.
VMUNET_METADATA = {"input_size_px": None, "patch_size_px": 4, "out_dim": "out_channels", "license": "Apache-2.0",
                   "reference": "Ruan & Xiang 2024 (VM-UNet); github.com/JCruan519/VM-UNet"}


def _init_linear(module: nn.Linear) -> None:
    nn.init.trunc_normal_(module.weight, std=0.02)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class SS2D(nn.Module):
    """2-D selective scan over four raster orders: (B, H, W, d_model) -> (B, H, W, d_model)."""

    def __init__(self, d_model: int, d_state: int = 8, expand: float = 2, dt_rank: int | str = "auto",
                 conv2d_kernel: int = 3, scan_conv: int = 1, backend: str | None = None):
        super().__init__()
        d_inner = int(expand * d_model)
        rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_inner = d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, conv2d_kernel, padding=conv2d_kernel // 2, groups=d_inner)
        self.branches = nn.ModuleList(
            SSMBranch(d_inner, d_state=d_state, d_conv=scan_conv, dt_rank=rank, backend=backend)
            for _ in range(4))
        if scan_conv == 1:
            for branch in self.branches:
                nn.init.ones_(branch.conv1d.weight)
                nn.init.zeros_(branch.conv1d.bias)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        _init_linear(self.in_proj)
        _init_linear(self.out_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        length = height * width
        u, z = self.in_proj(x).chunk(2, dim=-1)                                # (B, H, W, d_inner)
        u = self.conv2d(u.permute(0, 3, 1, 2).contiguous()).flatten(2)          # (B, d_inner, L) raster
        total = None
        for order, branch in zip(ss2d_orders(height, width), self.branches):
            y = order.undo(branch(order.apply(u, dim=-1).contiguous(), None), length, dim=-1)
            total = y if total is None else total + y
        y = self.out_norm(total.transpose(1, 2)).view(batch, height, width, self.d_inner)
        return self.out_proj(y * F.silu(z))


class VSSBlock(nn.Module):
    """Pre-norm residual SS2D: (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, **ss2d_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = SS2D(dim, **ss2d_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods -> one token: (B, H, W, C_in) -> (B, H/2, W/2, C_out); H, W even."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim_in)
        self.reduction = nn.Linear(4 * dim_in, dim_out, bias=False)
        _init_linear(self.reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """Each token -> scale x scale tokens: (B, H, W, C_in) -> (B, H*s, W*s, C_out)."""

    def __init__(self, dim_in: int, dim_out: int, scale: int = 2):
        super().__init__()
        self.scale, self.dim_out = scale, dim_out
        self.expand = nn.Linear(dim_in, scale * scale * dim_out, bias=False)
        self.norm = nn.LayerNorm(dim_out)
        _init_linear(self.expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        s = self.scale
        x = self.expand(x).view(batch, height, width, s, s, self.dim_out)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height * s, width * s, self.dim_out)
        return self.norm(x)


class VMUNet(nn.Module):
    """VM-UNet-style segmenter: images (B, in_channels, H, W) -> logits (B, out_channels, H, W)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, dims: tuple[int, ...] = (16, 32, 64),
                 depths: tuple[int, ...] = (1, 1, 1), patch_size: int = 2, d_state: int = 8,
                 expand: float = 2, scan_conv: int = 1, backend: str | None = None,
                 input_mean: tuple[float, ...] = (0.5, 0.5, 0.5), input_std: tuple[float, ...] = (0.25, 0.25, 0.25)):
        super().__init__()
        dims, depths = tuple(int(d) for d in dims), tuple(int(d) for d in depths)
        if len(dims) != len(depths) or not dims:
            raise ValueError(f"dims and depths need the same length >= 1, got {dims} and {depths}")
        if patch_size < 1 or min(dims) < 1 or min(depths) < 0:
            raise ValueError("patch_size and dims must be >= 1, depths >= 0")
        if len(input_mean) != in_channels or len(input_std) != in_channels:
            raise ValueError("input_mean and input_std need one value per input channel")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        self.patch_size = patch_size
        self.stride_multiple = patch_size * 2 ** (len(dims) - 1)
        block = dict(d_state=d_state, expand=expand, scan_conv=scan_conv, backend=backend)

        self.patch_embed = nn.Conv2d(in_channels, dims[0], patch_size, stride=patch_size)
        self.embed_norm = nn.LayerNorm(dims[0])
        self.encoder = nn.ModuleList(
            nn.Sequential(*(VSSBlock(dim, **block) for _ in range(depth))) for dim, depth in zip(dims, depths))
        self.merges = nn.ModuleList(PatchMerging(dims[i], dims[i + 1]) for i in range(len(dims) - 1))
        self.expands = nn.ModuleList(PatchExpand(dims[i + 1], dims[i]) for i in range(len(dims) - 1))
        self.decoder = nn.ModuleList(
            nn.Sequential(*(VSSBlock(dims[i], **block) for _ in range(depths[i]))) for i in range(len(dims) - 1))
        self.final_expand = PatchExpand(dims[0], dims[0], scale=patch_size)
        self.head = nn.Conv2d(dims[0], out_channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) images, got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        m = self.stride_multiple
        pad_h, pad_w = (-height) % m, (-width) % m
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
        x = self.embed_norm(self.patch_embed(images).permute(0, 2, 3, 1))       # (B, h, w, C0)
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x)
            if i < len(self.merges):
                skips.append(x)
                x = self.merges[i](x)
        for i in reversed(range(len(self.expands))):
            x = self.decoder[i](self.expands[i](x) + skips[i])
        x = self.final_expand(x).permute(0, 3, 1, 2)                              # (B, C0, H', W')
        return self.head(x)[..., :height, :width]


@register_segmenter("vmunet_tiny", **VMUNET_METADATA)
def vmunet_tiny(**kwargs) -> VMUNet:
    """~110k parameters, three stages (16, 32, 64), one VSS block each, 4x4 patches (VM-UNet's): CPU-sized."""
    return VMUNet(**{"dims": (16, 32, 64), "depths": (1, 1, 1), "patch_size": 4, "d_state": 8, **kwargs})


@register_segmenter("vmunet_small", **VMUNET_METADATA)
def vmunet_small(**kwargs) -> VMUNet:
    """Four stages (32 .. 256), two VSS blocks each, 4x4 patches (VM-UNet's layout, narrower): GPU."""
    return VMUNet(**{"dims": (32, 64, 128, 256), "depths": (2, 2, 2, 2), "patch_size": 4, "d_state": 16,
                     **kwargs})
