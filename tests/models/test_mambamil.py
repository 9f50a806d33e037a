"""MambaMIL: structure of the published model, the two init schemes, scan variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsi_pipeline.models.mil import create_aggregator
from wsi_pipeline.models.mil.mambamil import MambaMIL
from wsi_pipeline.ssm import BranchedMambaBlock, MambaBlock, Reverse, SSMBranch, Stride


def reference_parameter_count(in_dim: int, n_classes: int, n_branches: int, d: int = 512, n_layers: int = 2,
                              d_state: int = 16, d_conv: int = 4, expand: int = 2) -> int:
    """Parameters of the reference MambaMIL (isyangshu/MambaMIL models/MambaMIL.py), counted by hand."""
    d_inner, dt_rank = expand * d, -(-d // 16)
    branch = (d_inner * d_conv + d_inner                 # depthwise conv1d + bias
              + d_inner * (dt_rank + 2 * d_state)        # x_proj
              + dt_rank * d_inner + d_inner              # dt_proj + bias
              + d_inner * d_state + d_inner)             # A_log, D
    layer = 2 * d + d * 2 * d_inner + n_branches * branch + d_inner * d   # LayerNorm, in_proj, branches, out_proj
    return (in_dim * d + d + n_layers * layer + 2 * d     # _fc1, layers, final norm
            + d * 128 + 128 + 128 + 1                     # attention 512 → 128 → 1
            + d * n_classes + n_classes)                  # classifier


@pytest.mark.parametrize("name, n_branches", [("mambamil", 2), ("bimamba_mil", 2), ("mamba_mil", 1)])
def test_default_model_has_the_reference_architecture(name, n_branches):
    model = create_aggregator(name, in_dim=1024, n_classes=2)
    assert sum(p.numel() for p in model.parameters()) == reference_parameter_count(1024, 2, n_branches)
    assert len(model.layers) == 2
    assert isinstance(model.embed[1], torch.nn.GELU) and model.embed[2].p == 0.25
    mixer = model.layers[0].mixer
    if name == "mambamil":
        assert isinstance(mixer, BranchedMambaBlock) and isinstance(mixer.orders[1], Stride)
        assert mixer.orders[1].rate == 10
    elif name == "bimamba_mil":
        assert isinstance(mixer.orders[1], Reverse)
    else:
        assert isinstance(mixer, MambaBlock)


def test_rate_is_configurable():
    model = create_aggregator("mambamil", in_dim=8, n_classes=2, d_model=16, rate=4, n_layers=3)
    assert len(model.layers) == 3 and all(layer.mixer.orders[1].rate == 4 for layer in model.layers)


def ssm_branches(model):
    return [m for m in model.modules() if isinstance(m, SSMBranch)]


def standardized_weights(model):
    """Every nn.Linear weight divided by its Xavier std sqrt(2 / (fan_in + fan_out)), flattened."""
    pieces = []
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            fan_out, fan_in = layer.weight.shape
            pieces.append(layer.weight.detach().flatten() / (2.0 / (fan_in + fan_out)) ** 0.5)
    return torch.cat(pieces)


@pytest.mark.parametrize("name", ["mambamil", "bimamba_mil", "mamba_mil"])
def test_reference_init_is_xavier_normal_with_zero_biases_including_dt_proj(name):
    torch.manual_seed(0)
    model = create_aggregator(name, in_dim=64, n_classes=2, d_model=64, init="reference")
    z = standardized_weights(model)
    assert abs(z.mean()) < 0.02
    assert abs(z.std() - 1.0) < 0.02
    kurtosis = ((z - z.mean()) ** 4).mean() / z.var() ** 2
    assert abs(kurtosis - 3.0) < 0.2           # normal, not uniform (which has kurtosis 1.8)
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            fan_out, fan_in = layer.weight.shape
            if layer.weight.numel() >= 256:
                assert abs(layer.weight.std() / (2.0 / (fan_in + fan_out)) ** 0.5 - 1) < 0.25
            if layer.bias is not None:
                assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    branches = ssm_branches(model)
    assert branches and all(torch.equal(b.dt_proj.bias, torch.zeros_like(b.dt_proj.bias)) for b in branches)
    # Mamba's own parameters that are not nn.Linear keep their init.
    assert all(torch.equal(b.D, torch.ones_like(b.D)) for b in branches)


@pytest.mark.parametrize("name", ["mambamil", "bimamba_mil", "mamba_mil"])
def test_mamba_init_keeps_dt_bias_in_softplus_inverse_range(name):
    torch.manual_seed(0)
    model = create_aggregator(name, in_dim=64, n_classes=2, d_model=64, init="mamba", d_state=8)
    for branch in ssm_branches(model):
        dt = F.softplus(branch.dt_proj.bias)
        assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
        assert dt.std() > 0      # log-uniform draws, not a constant
        bound = branch.dt_rank ** -0.5
        assert branch.dt_proj.weight.abs().max() <= bound
    # Other Linear biases are zeroed (mamba-ssm's convention), weights keep PyTorch's default init.
    assert torch.equal(model.embed[0].bias, torch.zeros(64))
    assert torch.equal(model.head.bias, torch.zeros(2))


def test_unknown_init_or_mixer_is_rejected():
    with pytest.raises(ValueError, match="init"):
        create_aggregator("mambamil", in_dim=8, n_classes=2, d_model=16, init="xavier")
    with pytest.raises(ValueError, match="mixer"):
        MambaMIL(8, 2, mixer="transformer", d_model=16)


def test_stride_rate_larger_than_the_bag():
    torch.manual_seed(0)
    model = create_aggregator("mambamil", in_dim=8, n_classes=2, d_model=16, d_state=4, rate=50).eval()
    for length in (1, 3, 49, 50, 51):
        out = model(torch.randn(1, length, 8))
        assert out.logits.shape == (1, 2) and torch.isfinite(out.logits).all()
        torch.testing.assert_close(out.instance_scores.sum(), torch.tensor(1.0))


def test_mambamil_is_causal_in_its_forward_branch_but_sees_later_instances_through_the_stride_branch():
    """Appending instances changes the attention-pooled result (through softmax), but a plain Mamba's
    per-instance states before the appended part do not change; SRMamba's do (the stride branch
    mixes positions far apart)."""
    torch.manual_seed(0)
    x = torch.randn(1, 40, 8)
    extended = torch.cat([x, torch.randn(1, 5, 8)], dim=1)

    def hidden(model, bag):
        h = model.embed(bag)
        for layer in model.layers:
            h = layer(h)
        return h

    plain = create_aggregator("mamba_mil", in_dim=8, n_classes=2, d_model=16, d_state=4).eval()
    stride = create_aggregator("mambamil", in_dim=8, n_classes=2, d_model=16, d_state=4, rate=4).eval()
    with torch.no_grad():
        torch.testing.assert_close(hidden(plain, extended)[:, :40], hidden(plain, x))
        assert not torch.allclose(hidden(stride, extended)[:, :40], hidden(stride, x))


def test_final_norm_false_keeps_each_instances_magnitude_for_the_attention():
    """The final LayerNorm maps h and 3·h to the same vector, so an instance that differs from the
    slide only in magnitude (a centred feature far from the slide mean) gets the same attention as a
    small one; final_norm=False keeps the difference. Only the norm's 2·d parameters go."""
    torch.manual_seed(0)
    with_norm = MambaMIL(16, 2, d_model=16, n_layers=1, d_state=4, layer_scale=0.0).eval()
    without = MambaMIL(16, 2, d_model=16, n_layers=1, d_state=4, layer_scale=0.0, final_norm=False).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(with_norm) - count(without) == 2 * 16 and isinstance(without.norm, torch.nn.Identity)
    direction = torch.randn(16)
    bag = torch.stack([direction, 3.0 * direction, torch.randn(16)])[None]   # (1, 3, 16)
    for model in (with_norm, without):
        model.embed = torch.nn.Identity()   # layer_scale 0: the layer is the identity, h = the input
    with torch.no_grad():
        scores_norm = with_norm(bag).instance_scores[0]
        scores_plain = without(bag).instance_scores[0]
    torch.testing.assert_close(scores_norm[0], scores_norm[1], rtol=1e-4, atol=1e-6)
    assert abs(float(scores_plain[0] - scores_plain[1])) > 1e-3
    torch.testing.assert_close(scores_plain.sum(), torch.tensor(1.0))
    reloaded = create_aggregator("mambamil", in_dim=16, n_classes=2, d_model=16, n_layers=1, d_state=4,
                                 final_norm=False)
    reloaded.load_state_dict(MambaMIL(16, 2, d_model=16, n_layers=1, d_state=4, final_norm=False).state_dict())
