"""Vim4Path encoders against a reference that mirrors the official forward.

The reference below follows AtlasAnalyticsLab/Vim4Path@c102a68, the fork of hustvl/Vim@dd0358a its
weights were trained with:
- dino/vim/models_mamba.py, second ``VisionMamba`` (the one dino/main.py builds): ``prepare_tokens``
  (class token first + interpolated position embedding), then ``forward_features`` with
  ``use_middle_cls_token`` (the class token inserted again at M // 2), ``Block`` with
  ``fused_add_norm`` and ``residual_in_fp32``, the final fused add + ``norm_f``, output
  ``hidden_states[:, token_position]``; hustvl/Vim's vim/models_mamba.py ``forward_features``
  (middle token only, then ``x + pos_embed``) as ``layout="vim"``;
- dino/mamba-1p1p1/mamba_ssm/modules/mamba_simple.py, ``Mamba.forward`` with ``bimamba_type="v2"``
  and ``if_devide_out``: forward branch on ``xz``, backward branch on ``xz.flip([-1])`` with the
  ``*_b`` parameters, ``out_proj((out + out_b.flip([-1])) / 2)``; each branch as the non-fused path
  of that file (conv1d + SiLU, x_proj, ``dt_proj.weight @ dt``, scan with delta_bias, softplus, z);
- mamba_ssm/ops/triton/layernorm.py ``rms_norm_ref`` (RMSNorm without bias, eps 1e-5);
and scans with wsi_pipeline.ssm's sequential ``selective_scan_ref`` (a port of mamba-ssm's). The
encoder under test runs the native chunked scan and the project's causal conv.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.encoders import create_encoder, get_spec
from wsi_pipeline.encoders.registry import Encoder
from wsi_pipeline.encoders.vim4path import VIM4PATH_CONFIGS, convert_vim4path_state_dict
from wsi_pipeline.encoders.weights import EncoderWeightsError, load_into
from wsi_pipeline.ssm import selective_scan_ref


class RefMambaV2(nn.Module):
    def __init__(self, d_model, d_state=16, d_conv=4, expand=2):
        super().__init__()
        self.d_inner, self.d_state = expand * d_model, d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        for suffix in ("", "_b"):
            setattr(self, "conv1d" + suffix, nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                                       padding=d_conv - 1, bias=True))
            setattr(self, "x_proj" + suffix, nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            setattr(self, "dt_proj" + suffix, nn.Linear(self.dt_rank, self.d_inner, bias=True))
            a_name = "A_log" if suffix == "" else "A_b_log"
            # Values come from _randomise (the test builds full-size references on the meta device).
            setattr(self, a_name, nn.Parameter(torch.empty(self.d_inner, d_state)))
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(self.d_inner)))

    def branch(self, xz, suffix):
        seqlen = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        conv = getattr(self, "conv1d" + suffix)
        x = F.silu(conv(x)[..., :seqlen])
        x_dbl = getattr(self, "x_proj" + suffix)(x.transpose(1, 2).reshape(-1, self.d_inner))  # (b l) d
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt_proj = getattr(self, "dt_proj" + suffix)
        dt = (dt_proj.weight @ dt.t()).reshape(self.d_inner, -1, seqlen).transpose(0, 1)  # b d l
        B = B.reshape(-1, seqlen, self.d_state).transpose(1, 2)
        C = C.reshape(-1, seqlen, self.d_state).transpose(1, 2)
        A = -torch.exp((self.A_log if suffix == "" else self.A_b_log).float())
        return selective_scan_ref(x, dt, A, B, C, getattr(self, "D" + suffix).float(), z=z,
                                  delta_bias=dt_proj.bias.float(), delta_softplus=True)

    def forward(self, hidden_states):
        xz = (self.in_proj.weight @ hidden_states.reshape(-1, hidden_states.shape[-1]).t())
        xz = xz.reshape(xz.shape[0], hidden_states.shape[0], -1).transpose(0, 1)  # b d l
        out = self.branch(xz, "")
        out_b = self.branch(xz.flip([-1]), "_b")
        return F.linear((out + out_b.flip([-1])).transpose(1, 2) / 2, self.out_proj.weight)


class RefRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None, prenorm=False):   # rms_norm_ref with upcast, residual_in_fp32
        dtype = x.dtype
        x = x.float()
        if residual is not None:
            x = x + residual.float()
        rstd = 1 / torch.sqrt(x.square().mean(dim=-1, keepdim=True) + self.eps)
        out = (x * rstd * self.weight).to(dtype)
        return (out, x) if prenorm else out


class RefBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mixer, self.norm = RefMambaV2(dim), RefRMSNorm(dim)

    def forward(self, hidden_states, residual=None):
        hidden_states, residual = self.norm(hidden_states, residual, prenorm=True)
        return self.mixer(hidden_states), residual


class RefVisionMamba(nn.Module):
    def __init__(self, embed_dim, depth, img_size=224, patch_size=16, layout="vim4path"):
        super().__init__()
        self.layout, self.patch_size = layout, patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.layers = nn.ModuleList(RefBlock(embed_dim) for _ in range(depth))
        self.norm_f = RefRMSNorm(embed_dim)

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed, patch_pos_embed = self.pos_embed[:, 0], self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch_size + 0.1, h // self.patch_size + 0.1
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def forward(self, x):
        B, nc, w, h = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        if self.layout == "vim4path":   # prepare_tokens
            x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
            x = x + self.interpolate_pos_encoding(x, w, h)
        M = x.shape[1]
        token_position = M // 2
        x = torch.cat((x[:, :token_position], self.cls_token.expand(B, -1, -1), x[:, token_position:]), dim=1)
        if self.layout == "vim":
            x = x + self.pos_embed
        residual, hidden_states = None, x
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual)
        hidden_states = self.norm_f(hidden_states, residual, prenorm=False)
        return hidden_states[:, token_position, :]


def _randomise(model: nn.Module, seed: int) -> None:
    """Every parameter away from its init (norm weights, D, position embeddings included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("norm.weight", "norm_f.weight", ".D", ".D_b")):
                p.copy_(1.0 + 0.2 * noise)
            elif name in ("pos_embed", "cls_token"):
                p.copy_(0.5 * noise)
            elif name.endswith(("A_log", "A_b_log")):   # S4D-real init, perturbed
                p.copy_(torch.log(torch.arange(1, p.shape[1] + 1.0)).expand_as(p) + 0.1 * noise)
            else:
                p.copy_(noise * (0.5 / max(1.0, p[0].numel()) ** 0.5) if p.dim() > 1 else 0.1 * noise)


def _release_checkpoint(reference: nn.Module) -> dict:
    """The layout of Vim4Path's checkpoint['teacher']: MultiCropWrapper(backbone, DINOHead)."""
    state = {f"backbone.{k}": v for k, v in reference.state_dict().items()}
    state.update({"head.mlp.0.weight": torch.zeros(8, 4), "head.last_layer.weight_g": torch.ones(8, 1)})
    return state


@pytest.fixture(scope="module")
def reduced_pair():
    """vim4path_ti at depth 2 and its reference with the same (release-layout) weights."""
    torch.manual_seed(0)
    reference = RefVisionMamba(embed_dim=192, depth=2).eval()
    _randomise(reference, seed=1)
    ours = get_spec("vim4path_ti").build(depth=2).eval()
    load_into(ours, convert_vim4path_state_dict(_release_checkpoint(reference)), source="reference")
    return reference, ours


@pytest.mark.parametrize("side_px", [224, 160])
def test_equals_reference_forward(reduced_pair, side_px):
    # 160 px: a 10 x 10 grid, so the position embedding is interpolated as Vim4Path does it.
    reference, ours = reduced_pair
    x = torch.randn(2, 3, side_px, side_px, generator=torch.Generator().manual_seed(side_px))
    with torch.no_grad():
        want, got = reference(x), ours(x)
    assert got.shape == (2, 192)
    assert want.abs().mean() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hustvl_vim_token_layout_equals_reference():
    torch.manual_seed(0)
    reference = RefVisionMamba(embed_dim=64, depth=1, img_size=64, layout="vim").eval()
    _randomise(reference, seed=2)
    ours = get_spec("vim4path_ti").build(depth=1, embed_dim=64, img_size=64, token_layout="vim").eval()
    load_into(ours, reference.state_dict(), source="reference")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(VIM4PATH_CONFIGS))
def test_full_size_keys_and_shapes_match_release(name):
    embed_dim, depth = VIM4PATH_CONFIGS[name]
    with torch.device("meta"):
        ours = get_spec(name).build()
        reference = RefVisionMamba(embed_dim=embed_dim, depth=depth)
    release = convert_vim4path_state_dict(_release_checkpoint(reference))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in release.items()}
    n_params = sum(p.numel() for p in ours.parameters())
    # Vim paper (Zhu et al. 2024), Table 1: Vim-Ti 7M, Vim-S 26M parameters; Vim-Ti-plus (384 x 12) ~13M.
    assert round(n_params / 1e6) == {"vim4path_ti": 7, "vim4path_ti_plus": 13, "vim4path_s": 25}[name]
    assert ours.state_dict()["pos_embed"].shape == (1, 197, embed_dim)
    assert ours.state_dict()["layers.0.mixer.x_proj_b.weight"].shape == (math.ceil(embed_dim / 16) + 32, 2 * embed_dim)


def test_encoder_output_dims_and_preprocessing():
    for name, (embed_dim, _) in VIM4PATH_CONFIGS.items():
        spec = get_spec(name)
        assert spec.out_dim == embed_dim and spec.resize_px == 224 and spec.native_mpp == 1.0
        encoder = Encoder(spec.build(depth=1).eval(), spec, weights_source="random", weights_sha256="random")
        # 256 px patches are resized to the authors' 224 px input on the way in.
        images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
        assert encoder.preprocess(images).shape == (2, 3, 224, 224)
        with torch.no_grad():
            assert encoder(images).shape == (2, embed_dim)


def test_wrong_configuration_checkpoint_is_one_error(tmp_path):
    # A vim4path_s teacher given as vim4path_ti_plus (same width, other depth): one error naming keys.
    with torch.device("meta"):
        s_model = RefVisionMamba(embed_dim=384, depth=24)
    state = {k: torch.zeros(v.shape) for k, v in _release_checkpoint(s_model).items()
             if k.startswith(("backbone.layers.23.", "backbone.pos_embed", "head."))}
    with torch.device("meta"):
        ours = get_spec("vim4path_ti_plus").build()
    with pytest.raises(EncoderWeightsError, match="layers.23"):
        load_into(ours, convert_vim4path_state_dict(state), source="vim4path_s.pth")


def test_random_weights_build_through_the_registry():
    encoder = create_encoder("vim4path_ti", "random")
    assert encoder.out_dim == 192 and encoder.weights_sha256 == "random"
