"""twodmamba against 2DMamba's model code (AtlasAnalyticsLab/2DMamba @ 9fe12aa, 2DMambaMIL/models/
MambaMIL_2D.py and mamba_simple.py, transliterated below: the PyTorch path, its PScan_2D with the
one-read fix of tests/ssm/test_scan2d.py): same weights -> same logits (fp64, grid "upstream", 1
and 2 layers); parameter counts equal upstream's at its defaults; the grid modes; the errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_pipeline.models.mil import create_aggregator

from ..ssm.test_scan2d import upstream_pscan_2d


# -- upstream, transliterated (non-CUDA path, pscan=True, pos_emb_type None, inner_layernorms False) --
class UpRMSNorm(nn.Module):
    def __init__(self, d_model, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class UpMambaBlock(nn.Module):
    def __init__(self, d_model, d_state, expand_factor=2, d_conv=4):
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank = expand_factor * d_model, d_state, math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, bias=True, groups=self.d_inner,
                                padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, x):
        BS, W, H, _ = x.shape
        xz = self.in_proj(x)
        x, z = xz.chunk(2, dim=-1)
        x = x.view(BS, W * H, -1).transpose(1, 2)
        x = self.conv1d(x)[:, :, :W * H]
        x = x.view(BS, -1, W, H).permute(0, 2, 3, 1)
        x = F.silu(x)
        y = self.ssm_2d(x, z)
        z = F.silu(z)
        return self.out_proj(y * z)

    def ssm_2d(self, x, z=None):
        A = -torch.exp(self.A_log.float())
        D = self.D.float()
        deltaBC = self.x_proj(x)
        delta, B, C = torch.split(deltaBC, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(delta))
        deltaA = torch.exp(delta.unsqueeze(-1) * A)
        deltaB = delta.unsqueeze(-1) * B.unsqueeze(3)
        BX = deltaB * (x.unsqueeze(-1))
        hs = upstream_pscan_2d(deltaA, BX, fixed=True)
        y = (hs @ C.unsqueeze(-1)).squeeze(4)
        return y + D * x


class UpResidualBlock(nn.Module):
    def __init__(self, d_model, d_state, max_w, max_h, patch_size):
        super().__init__()
        self.mixer = UpMambaBlock(d_model, d_state)
        self.norm = UpRMSNorm(d_model)
        self.max_w, self.max_h, self.patch_size = max_w, max_h, patch_size

    def forward(self, x, coords=None, pad_token=None):
        if len(x.shape) == 3:
            x = reconstruct_2d_wsi(x, coords, self.max_w, self.max_h, self.patch_size, pad_token)
        return self.mixer(self.norm(x)) + x


def reconstruct_2d_wsi(feats, coords, max_w, max_h, patch_size, pad_token):
    normalized_coords = coords // patch_size
    w_indexes = normalized_coords[:, 0].int()
    h_indexes = normalized_coords[:, 1].int()
    max_w = max_w // patch_size + 1
    max_h = max_h // patch_size + 1
    d = feats.shape[-1]
    results = pad_token.expand((1, max_h, max_w, d)).to(feats.device).clone()
    results[:, h_indexes, w_indexes, :] = feats
    return results


class UpMamba(nn.Module):
    def __init__(self, d_model, n_layers, d_state, max_w, max_h, patch_size, pad_token="trainable"):
        super().__init__()
        if pad_token == "zero":
            self.pad_token = nn.Parameter(torch.zeros(d_model), requires_grad=False)
        else:
            self.pad_token = nn.Parameter(torch.rand(d_model), requires_grad=True)
        self.layers = nn.ModuleList([UpResidualBlock(d_model, d_state, max_w, max_h, patch_size)
                                     for _ in range(n_layers)])

    def forward(self, x, coords=None):
        for layer in self.layers:
            x = layer(x, coords, self.pad_token)
        return x


class UpMambaMIL2D(nn.Module):
    def __init__(self, in_dim=1024, n_classes=2, dim=128, n_layers=1, d_state=16, drop_out=0.25,
                 max_w=100000, max_h=100000, patch_size=512, pad_token="trainable"):
        super().__init__()
        self._fc1 = [nn.Linear(in_dim, dim), nn.GELU()] + ([nn.Dropout(drop_out)] if drop_out > 0 else [])
        self._fc1 = nn.Sequential(*self._fc1)
        self.norm = nn.LayerNorm(dim)
        self.layers = UpMamba(dim, n_layers, d_state, max_w, max_h, patch_size, pad_token)
        self.dim = dim
        self.attention = nn.Sequential(nn.Linear(dim, 128), nn.Tanh(), nn.Linear(128, 1))
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, x, coords):
        h = self._fc1(x.expand(1, -1, -1) if x.dim() == 2 else x)
        h = self.layers(h, coords)
        h = self.norm(h)
        A = self.attention(h)
        A = A.permute(0, 3, 1, 2).view(1, 1, -1)
        h = h.view(1, -1, self.dim)
        A = F.softmax(A, dim=-1)
        return self.classifier(torch.bmm(A, h).squeeze(0))


def ours_from_upstream(upstream: UpMambaMIL2D) -> dict:
    """Upstream's state dict under our parameter names."""
    renames = [("_fc1.", "embed."), ("layers.pad_token", "pad_token"), ("layers.layers.", "layers."),
               ("attention.", "attention.score."), ("classifier.", "head.")]
    out = {}
    for name, value in upstream.state_dict().items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = value
    return out


def sparse_coords(n, side, step, generator, origin=(0, 0)):
    cells = torch.randperm(side * side, generator=generator)[:n]
    return torch.stack([cells % side * step + origin[0], cells // side * step + origin[1]], dim=1)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_forward_equals_upstream_model_code_fp64(n_layers):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(n_layers)
    kw = dict(d_state=4, n_layers=n_layers)
    upstream = UpMambaMIL2D(in_dim=24, n_classes=3, dim=16, max_w=9 * 512 + 100, max_h=6 * 512 + 7,
                            patch_size=512, **kw).double().eval()
    ours = create_aggregator("twodmamba", 24, 3, d_model=16, grid="upstream", max_x=9 * 512 + 100,
                             max_y=6 * 512 + 7, patch_size=512, **kw).double().eval()
    ours.load_state_dict(ours_from_upstream(upstream))
    with torch.no_grad():            # a random pad token and biases, so every part counts
        for p in upstream.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        ours.load_state_dict(ours_from_upstream(upstream))
    features = torch.randn(1, 23, 24, generator=gen, dtype=torch.float64)
    coords = sparse_coords(23, 7, 512, gen) + torch.randint(0, 500, (23, 2), generator=gen)  # not on 512 multiples
    with torch.no_grad():
        want = upstream(features, coords)
        got = ours(features, coords[None])
    torch.testing.assert_close(got.logits, want, rtol=1e-10, atol=1e-10)
    assert got.instance_scores.shape == (1, 23)


@pytest.mark.parametrize("pad_token", ["trainable", "zero"])
def test_parameter_counts_equal_upstream_at_its_defaults(pad_token):
    """main.py defaults: in_dim 1024, mambamil_dim 128, state 16, 1 layer, drop_out 0.25."""
    upstream = UpMambaMIL2D(pad_token=pad_token, n_classes=3)
    ours = create_aggregator("twodmamba", 1024, 3, pad_token=pad_token)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in upstream.parameters())
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, upstream)]
    assert trainable[0] == trainable[1]
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in ours_from_upstream(upstream).items()}


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(1)
    return dict(d_model=8, d_state=2, expand=1, dropout=0.0)


def test_tight_equals_upstream_on_a_full_grid_at_the_origin_and_differs_on_a_sparse_one(small):
    gen = torch.Generator().manual_seed(3)
    tight = create_aggregator("twodmamba", 12, 2, **small).eval()
    up = create_aggregator("twodmamba", 12, 2, **small, grid="upstream", max_x=4 * 256, max_y=2 * 256,
                           patch_size=256).eval()
    up.load_state_dict(tight.state_dict())
    full = torch.stack(torch.meshgrid(torch.arange(5) * 256, torch.arange(3) * 256, indexing="xy"), -1).reshape(-1, 2)
    features = torch.randn(1, 15, 12, generator=gen)
    order = torch.randperm(15, generator=gen)                 # bag order does not matter: cells do
    with torch.no_grad():
        a, b = tight(features, full[None]), up(features, full[None])
        c = tight(features[:, order], full[order][None])
        torch.testing.assert_close(a.logits, b.logits)
        torch.testing.assert_close(c.logits, a.logits)
        torch.testing.assert_close(c.instance_scores, a.instance_scores[:, order])
        sparse = full[[0, 4, 7, 14]]
        t, u = tight(features[:, :4], sparse[None]), up(features[:, :4], sparse[None])
    assert not torch.allclose(t.logits, u.logits)
    torch.testing.assert_close(t.instance_scores.sum(), torch.tensor(1.0))      # instances only
    assert float(u.instance_scores.sum()) < 1.0                                 # padding took some


def test_tight_grid_ignores_where_the_slide_lies(small):
    gen = torch.Generator().manual_seed(4)
    model = create_aggregator("twodmamba", 12, 2, **small).eval()
    coords = sparse_coords(20, 6, 224, gen)
    features = torch.randn(1, 20, 12, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model(features, coords[None]).logits,
                                   model(features, (coords + torch.tensor([10_000, 3_000]))[None]).logits)


def test_errors_name_the_problem(small):
    with pytest.raises(ValueError, match="max_x and max_y"):
        create_aggregator("twodmamba", 12, 2, **small, grid="upstream")
    with pytest.raises(ValueError, match="grid must be one of"):
        create_aggregator("twodmamba", 12, 2, **small, grid="padded")
    model = create_aggregator("twodmamba", 12, 2, **small, grid="upstream", max_x=512, max_y=512, patch_size=256)
    with pytest.raises(ValueError, match=r"instance 1 at \(x, y\) = \[800, 0\] lies outside"):
        model(torch.randn(1, 2, 12), torch.tensor([[[0, 0], [800, 0]]]))
    with pytest.raises(ValueError, match="coords"):
        model(torch.randn(1, 2, 12), torch.zeros(1, 2, 3))


def test_trains_the_pad_token_and_every_layer(small):
    gen = torch.Generator().manual_seed(5)
    model = create_aggregator("twodmamba", 12, 2, **small)
    coords = sparse_coords(10, 5, 256, gen)
    out = model(torch.randn(1, 10, 12, generator=gen), coords[None])
    F.cross_entropy(out.logits, torch.tensor([1])).backward()
    assert model.pad_token.grad is not None and model.pad_token.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_paper_preset_is_upstreams_model_and_recipe():
    from pathlib import Path

    from wsi_pipeline.run.config import load_config

    text = (Path(__file__).resolve().parents[2] / "configs" / "models" / "twodmamba_paper.yaml")
    train = load_config(text).train
    assert "github.com/AtlasAnalyticsLab/2DMamba @ 9fe12aa" in text.read_text()
    ours = create_aggregator(train.model, 1024, 3, **train.model_args)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in UpMambaMIL2D(n_classes=3).parameters())
    assert all(m.mixer.dt_proj.bias.abs().max() == 0 for m in ours.layers)      # upstream's init wipes it
    assert (train.optimizer, train.lr, train.weight_decay, train.lr_schedule, train.epochs, train.patience) \
        == ("adamw", 1e-4, 1e-5, "cosine", 20, 20)
