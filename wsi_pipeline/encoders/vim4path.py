"""Vim4Path: Vision Mamba (Vim) patch encoders pretrained with DINO on Camelyon16 at 10×.

Nasiri-Sarvi et al., "Vim4Path: Self-Supervised Vision Mamba for Histopathology Images", CVPR
Workshops 2024; code AtlasAnalyticsLab/Vim4Path@c102a68 (dino/config.py, dino/vim/models_mamba.py,
dino/mamba-1p1p1/mamba_ssm/modules/mamba_simple.py), a fork of hustvl/Vim@dd0358a.

The architecture (all three configurations of dino/config.py: patch and stride 16, RMSNorm eps 1e-5,
fused add + norm with the residual stream in fp32, absolute position embedding, no RoPE,
``bimamba_type="v2"`` with ``if_devide_out``, middle class token), built here on this project's
Mamba core (wsi_pipeline.ssm: the chunked CPU scan, mamba-ssm's CUDA kernel on a GPU when installed):

- each layer is Add -> RMSNorm -> mixer: ``residual = residual + hidden`` (fp32), ``hidden =
  mixer(RMSNorm(residual))``; after the last layer ``RMSNorm_f(residual + hidden)``;
- the mixer is Mamba with a second, flipped branch: ``xz = in_proj(h)``; ``y = scan(xz)``,
  ``y_b = scan_b(flip(xz))`` with its own ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log``,
  ``D_b``; ``out_proj((y + flip(y_b)) / 2)``;
- tokens (Vim4Path's ``prepare_tokens`` then ``forward_features``): the class token is put first and
  the position embedding (interpolated DINO-style for another grid) added; then the *same* class
  token, without a position embedding, is inserted again at the middle (index (N + 1) // 2) of the
  N + 2 tokens, and that middle token, after the final norm, is the feature. hustvl/Vim's own models
  have only the middle token, with the embedding of that position (``token_layout="vim"`` here).

Parameter names are those of the released checkpoints' backbone (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``layers.{i}.mixer.*``, ``layers.{i}.norm.weight``, ``norm_f.weight``);
:func:`convert_vim4path_state_dict` takes the DINO teacher out of the release layout.
(B, 3, H, W) normalised images -> (B, embed_dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ssm.conv1d import causal_conv1d
from ..ssm.mamba_block import MambaBlock, SSMBranch, _split_xz, project_and_scan
from .registry import EncoderSpec, register_encoder

# dino/config.py: (embed_dim, depth) per architecture.
VIM4PATH_CONFIGS = {"vim4path_ti": (192, 24), "vim4path_ti_plus": (384, 12), "vim4path_s": (384, 24)}
TOKEN_LAYOUTS = ("vim4path", "vim")


class RMSNorm(nn.Module):
    """Mamba's RMSNorm (weight, no bias), fused with the residual add as in its Triton kernel.

    ``forward(hidden, residual)`` -> (normed, residual_out): residual_out = hidden + residual (or
    hidden alone) in fp32, normed = its RMS norm computed in fp32, returned in hidden's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None):
        total = hidden.float() if residual is None else residual.float() + hidden.float()
        rstd = torch.rsqrt(total.square().mean(dim=-1, keepdim=True) + self.eps)
        return (total * rstd * self.weight.float()).to(hidden.dtype), total


class BiMambaV2(MambaBlock):
    """Vim's ``Mamba(bimamba_type="v2", if_devide_out=True)``: (B, L, d_model) -> (B, L, d_model).

    The forward branch is :class:`MambaBlock`'s (``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``,
    ``D``); the backward branch has the same shapes and init under Vim's ``*_b`` names and scans the
    flipped sequence. ``divide_out``: the two branches are averaged (True) or summed before out_proj."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 divide_out: bool = True, backend: str | None = None):
        super().__init__(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        self.divide_out = divide_out
        backward = SSMBranch(self.d_inner, d_state, d_conv, self.dt_rank, backend=backend)
        # The branch's modules and parameters, under the names the checkpoints use.
        self.conv1d_b, self.x_proj_b, self.dt_proj_b = backward.conv1d, backward.x_proj, backward.dt_proj
        self.A_b_log, self.D_b = backward.A_log, backward.D

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden_states)  # (B, L, 2 * d_inner)
        y = self.inner(*_split_xz(xz))    # (B, d_inner, L)
        x_b, z_b = _split_xz(xz.flip(1))
        x_b = causal_conv1d(x_b, self.conv1d_b.weight.squeeze(1), self.conv1d_b.bias, "silu", backend=self.backend)
        y_b = project_and_scan(x_b, z_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, self.d_state,
                               backend=self.backend)
        y = y + y_b.flip(-1)
        if self.divide_out:
            y = y / 2
        return self.out_proj(y.transpose(1, 2))


class VimLayer(nn.Module):
    """Add -> RMSNorm -> mixer; returns (mixer output, fp32 residual stream)."""

    def __init__(self, dim: int, d_state: int = 16, norm_eps: float = 1e-5, backend: str | None = None):
        super().__init__()
        self.mixer = BiMambaV2(dim, d_state=d_state, backend=backend)
        self.norm = RMSNorm(dim, eps=norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None):
        normed, residual = self.norm(hidden, residual)
        return self.mixer(normed), residual


class PatchEmbed(nn.Module):
    """Non-overlapping patches (patch = stride, as in all Vim4Path configurations): (B, 3, H, W) ->
    (B, (H // p) * (W // p), D), row-major."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionMamba(nn.Module):
    """Vim encoder returning the middle class token after the final norm: (B, 3, H, W) -> (B, D).

    ``img_size`` sets the trained grid of the position embedding ((img_size // patch_size)² + 1
    entries); other input sizes interpolate it as Vim4Path does (bicubic, DINO's +0.1 scale).
    """

    def __init__(self, embed_dim: int = 192, depth: int = 24, img_size: int = 224, patch_size: int = 16,
                 d_state: int = 16, norm_eps: float = 1e-5, token_layout: str = "vim4path",
                 backend: str | None = None):
        super().__init__()
        if token_layout not in TOKEN_LAYOUTS:
            raise ValueError(f"token_layout must be one of {TOKEN_LAYOUTS}, got {token_layout!r}")
        self.token_layout = token_layout
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.layers = nn.ModuleList(VimLayer(embed_dim, d_state, norm_eps, backend) for _ in range(depth))
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _interpolated_pos_embed(self, n_patches: int, height_px: int, width_px: int) -> torch.Tensor:
        """Vim4Path's interpolate_pos_encoding: (1, n_patches + 1, D), class entry first."""
        n_trained = self.pos_embed.shape[1] - 1
        if n_patches == n_trained and height_px == width_px:
            return self.pos_embed
        side = math.sqrt(n_trained)
        rows = height_px // self.patch_embed.patch_size + 0.1   # +0.1: facebookresearch/dino#8
        cols = width_px // self.patch_embed.patch_size + 0.1
        patch_pos = self.pos_embed[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=(rows / side, cols / side), mode="bicubic")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, self.embed_dim)
        return torch.cat((self.pos_embed[:, :1], patch_pos), dim=1)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Images -> (tokens (B, L, D), index of the class token read out)."""
        batch, _, height, width = x.shape
        patches = self.patch_embed(x)
        cls = self.cls_token.expand(batch, -1, -1)
        if self.token_layout == "vim4path":
            tokens = torch.cat((cls, patches), dim=1)
            tokens = tokens + self._interpolated_pos_embed(patches.shape[1], height, width)
            middle = tokens.shape[1] // 2
            return torch.cat((tokens[:, :middle], cls, tokens[:, middle:]), dim=1), middle
        middle = patches.shape[1] // 2
        tokens = torch.cat((patches[:, :middle], cls, patches[:, middle:]), dim=1)
        if tokens.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"token_layout 'vim' takes the trained grid only ({self.pos_embed.shape[1] - 1} "
                             f"patches), got {patches.shape[1]}")
        return tokens + self.pos_embed, middle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, middle = self.tokens(x)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        out, _ = self.norm_f(hidden, residual)
        return out[:, middle]


def convert_vim4path_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Vim4Path DINO checkpoint's teacher (or student) -> this build's keys: the backbone's keys
    without MultiCropWrapper's ``backbone.`` prefix; the DINO projection head (``head.*``) dropped.
    A plain backbone state dict passes through (a classifier ``head.*`` is dropped too)."""
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def _builder(embed_dim: int, depth: int):
    def build(**overrides) -> nn.Module:
        # overrides (depth, embed_dim, img_size, backend, ...) build a smaller model, e.g. for tests.
        return VisionMamba(**{"embed_dim": embed_dim, "depth": depth, **overrides})
    return build


_REFERENCE = ("Nasiri-Sarvi et al., CVPR Workshops 2024 (Vim4Path); github.com/AtlasAnalyticsLab/Vim4Path "
              "@c102a68 (dino/vim/models_mamba.py, dino/config.py); Vim: github.com/hustvl/Vim @dd0358a")
_NOTES = ("DINO-pretrained on Camelyon16 224 px patches at level 2 (10x). The release is DINO's training "
          "checkpoint.pth: its 'teacher' holds the encoder (backbone.* keys, a DINO head beside it), and it "
          "also pickles the run's argparse.Namespace, which a plain weights_only load refuses; if the loader "
          "does not allow that one class, extract the teacher once where you trust the file: "
          "torch.save(torch.load(f, weights_only=False)['teacher'], 'vim4path_teacher.pth')")

for _name, (_dim, _depth) in VIM4PATH_CONFIGS.items():
    register_encoder(EncoderSpec(
        name=_name, build=_builder(_dim, _depth), out_dim=_dim, input_size_px=224, patch_size_px=16,
        # Camelyon16 level 2: 4 x 0.243 (Radboud) or 4 x 0.226 µm/px (Utrecht), "10x".
        native_mpp=1.0, recommended_patch_px=224,
        # eval_linear.py: Resize(224, bicubic) + CenterCrop(224); mil_data_creation.py (the slide-level
        # features): PIL resize to 224 x 224 (bicubic, antialiased) — both no-ops on 224 px patches.
        resize_px=224, interpolation="bicubic", antialias=True, crop_px=None,
        output="middle class token after the final RMSNorm",
        # The authors extract features without autocast (mil_data_creation.py); the scan is fp32 anyway.
        precision="fp32", convert_state_dict=convert_vim4path_state_dict,
        license="Apache-2.0 (Vim) / MIT (Vim4Path); built on this project's Mamba scan",
        weights_license="not stated (repository MIT); Camelyon16 training data",
        hub_repo="github.com/AtlasAnalyticsLab/Vim4Path (README: Dropbox links)",
        files=("checkpoint.pth",), notes=_NOTES, reference=_REFERENCE))
