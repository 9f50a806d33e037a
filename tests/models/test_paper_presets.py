"""configs/models/*_paper.yaml build the official architectures: parameter counts and layer shapes.

The official models cannot be imported here (MambaMIL and GMMamba need the CUDA-only mamba-ssm
fork they vendor; TransMIL needs CUDA in its forward and the nystrom_attention package), so the
numbers below are counted by formula from the layer definitions in their ``__init__``, read at the
commit each preset pins:

- MambaMIL  github.com/isyangshu/MambaMIL @ 9aea39efc13fdcd3703b5b54c28a64887b4acbd7
  models/MambaMIL.py (MambaMIL.__init__: _fc1, layers = [LayerNorm, SRMamba] x 2, norm, attention,
  classifier) and mamba/mamba_ssm/modules/srmamba.py (SRMamba.__init__).
- GMMamba   github.com/titizheng/GMMamba @ 70576f1aaeef0d7041d6860799ade1ac905b85aa
  models/IMM.py (IMM_block.__init__), mamba BiMamba (same layout as SRMamba), models/CSS.py
  (CSS_block: nn.MultiheadAttention(512, 8, bias=False)), models/classmodel.py (fc2, cls_token,
  GroupsSuper_Layer x num_layers=1 of Attention(dim 512, heads 8, dim_head 64)).
- TransMIL  github.com/szc19990412/TransMIL @ 9d6aee57c7c72375fb9132dc58cd8c9b0f0a949c
  models/TransMIL.py (TransMIL.__init__, TransLayer, PPEG) with lucidrains' nystrom_attention
  defaults (to_qkv without bias, to_out with bias, res_conv (33, 1) depthwise without bias).
- CLAM      github.com/mahmoodlab/CLAM @ 53e2409d4a8189c682c173382964a85f114f923c
  models/model_clam.py (CLAM_SB.__init__, size "small" [1024, 512, 256], gate=True).

Counts are for the parameters the forward pass uses: GMMamba's IMM_block also builds an
``_fc1 = Linear(512, 512)`` it never calls (+262,656 in its printed total) and CLAM_SB builds
``instance_classifiers`` (n_classes x Linear(512, 2)) used only by its instance loss, which the
ABMIL preset leaves out.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from wsi_pipeline.models.mil import create_aggregator
from wsi_pipeline.models.mil.coord_groups import GroupCache
from wsi_pipeline.run.config import load_config

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "models"
N_CLASSES = 2


def official_mamba_block(d_model: int = 512, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> int:
    """SRMamba / BiMamba.__init__: shared in_proj and out_proj (bias=False), and per scan branch
    conv1d (depthwise, bias), x_proj (no bias), dt_proj (bias), A_log (d_inner, d_state), D."""
    d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
    branch = (d_inner * d_conv + d_inner) + d_inner * (dt_rank + 2 * d_state) + (dt_rank * d_inner + d_inner) \
        + d_inner * d_state + d_inner
    return d_model * 2 * d_inner + 2 * branch + d_inner * d_model


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


LAYER_NORM_512 = 2 * 512
MAMBA_BLOCK_512 = 1_816_576          # official_mamba_block(): 1,048,576 + 2 x 121,856 + 524,288
ATTENTION_512_128 = 65_793           # Linear(512, 128), Tanh, Linear(128, 1)

# Official totals for in_dim (1024; GMMamba 512) and 2 classes, each sum spelled out.
OFFICIAL_PARAMS = {
    # _fc1 + 2 x (LayerNorm + SRMamba) + norm + attention + classifier
    "mambamil": linear(1024, 512) + 2 * (LAYER_NORM_512 + MAMBA_BLOCK_512) + LAYER_NORM_512
    + ATTENTION_512_128 + linear(512, N_CLASSES),
    # IMM: 2 x (LayerNorm + BiMamba) + norm + mask_attention + group_ins_attention;
    # CSS: MultiheadAttention in_proj (3 x 512 x 512) + out_proj (512 x 512), no biases;
    # classifier: cls_token + to_qkv (no bias) + to_out + fc2
    "gmmamba": 2 * (LAYER_NORM_512 + MAMBA_BLOCK_512) + LAYER_NORM_512 + 2 * ATTENTION_512_128
    + 4 * 512 * 512 + 512 + linear(512, 1536, bias=False) + linear(512, 512) + linear(512, N_CLASSES),
    # _fc1 + cls_token + 2 x TransLayer (norm, to_qkv, to_out, res_conv 8 x 33) + PPEG 7/5/3 depthwise
    # convs with bias + norm + _fc2
    "transmil": linear(1024, 512) + 512
    + 2 * (LAYER_NORM_512 + linear(512, 1536, bias=False) + linear(512, 512) + 8 * 33)
    + sum(512 * k * k + 512 for k in (7, 5, 3)) + LAYER_NORM_512 + linear(512, N_CLASSES),
    # fc + attention_a + attention_b + attention_c + classifiers
    "clam_abmil": linear(1024, 512) + 2 * linear(512, 256) + linear(256, 1) + linear(512, N_CLASSES),
}
# The same totals as plain numbers (what their model printouts would give, less the unused layers).
OFFICIAL_TOTALS = {"mambamil": 4_227_843, "gmmamba": 5_867_012, "transmil": 2_672_146, "clam_abmil": 788_739}
IN_DIM = {"mambamil": 1024, "gmmamba": 512, "transmil": 1024, "clam_abmil": 1024}
COMMITS = {
    "mambamil": ("isyangshu/MambaMIL", "9aea39efc13fdcd3703b5b54c28a64887b4acbd7"),
    "gmmamba": ("titizheng/GMMamba", "70576f1aaeef0d7041d6860799ade1ac905b85aa"),
    "transmil": ("szc19990412/TransMIL", "9d6aee57c7c72375fb9132dc58cd8c9b0f0a949c"),
    "clam_abmil": ("mahmoodlab/CLAM", "53e2409d4a8189c682c173382964a85f114f923c"),
}

# (our parameter, the official state_dict key, its shape in the official model).
_SRMAMBA = [
    ("mixer.in_proj.weight", "in_proj.weight", (2048, 512)),
    ("mixer.branches.0.conv1d.weight", "conv1d.weight", (1024, 1, 4)),
    ("mixer.branches.1.conv1d.weight", "conv1d_b.weight", (1024, 1, 4)),
    ("mixer.branches.0.x_proj.weight", "x_proj.weight", (64, 1024)),
    ("mixer.branches.1.x_proj.weight", "x_proj_b.weight", (64, 1024)),
    ("mixer.branches.0.dt_proj.weight", "dt_proj.weight", (1024, 32)),
    ("mixer.branches.1.dt_proj.bias", "dt_proj_b.bias", (1024,)),
    ("mixer.branches.0.A_log", "A_log", (1024, 16)),
    ("mixer.branches.1.A_log", "A_b_log", (1024, 16)),
    ("mixer.branches.1.D", "D_b", (1024,)),
    ("mixer.out_proj.weight", "out_proj.weight", (512, 1024)),
]
OFFICIAL_SHAPES = {
    "mambamil": [("embed.0.weight", "_fc1.0.weight", (512, 1024))]
    + [(f"layers.{i}.norm.weight", f"layers.{i}.0.weight", (512,)) for i in range(2)]
    + [(f"layers.{i}.{ours}", f"layers.{i}.1.{theirs}", shape) for i in range(2) for ours, theirs, shape in _SRMAMBA]
    + [("norm.weight", "norm.weight", (512,)), ("attention.score.0.weight", "attention.0.weight", (128, 512)),
       ("attention.score.2.weight", "attention.2.weight", (1, 128)), ("head.weight", "classifier.weight", (2, 512))],
    "gmmamba": [(f"imm.bimamba_{i}.norm.weight", f"BiMamba{i}.0.weight", (512,)) for i in (1, 2)]
    + [(f"imm.bimamba_{i}.{ours}", f"BiMamba{i}.1.{theirs}", shape)
       for i in (1, 2) for ours, theirs, shape in _SRMAMBA]
    + [("imm.norm.weight", "norm.weight", (512,)),
       ("imm.mask_score.0.weight", "mask_attention.0.weight", (128, 512)),
       ("imm.group_attention.score.0.weight", "group_ins_attention.0.weight", (128, 512)),
       ("css.refine.in_proj_weight", "stoken_refine.in_proj_weight", (1536, 512)),
       ("css.refine.out_proj.weight", "stoken_refine.out_proj.weight", (512, 512)),
       ("cls_token", "cls_token", (1, 1, 512)),
       ("cls_layers.0.to_qkv.weight", "GroupsSuper_Layer.0.AttenLayer.attn.to_qkv.weight", (1536, 512)),
       ("cls_layers.0.to_out.0.weight", "GroupsSuper_Layer.0.AttenLayer.attn.to_out.0.weight", (512, 512)),
       ("head.weight", "fc2.weight", (2, 512))],
    "transmil": [("fc.0.weight", "_fc1.0.weight", (512, 1024)), ("cls_token", "cls_token", (1, 1, 512))]
    + [(f"layer_{i}.{ours}", f"layer{i}.{theirs}", shape) for i in (1, 2) for ours, theirs, shape in [
        ("norm.weight", "norm.weight", (512,)), ("attention.to_qkv.weight", "attn.to_qkv.weight", (1536, 512)),
        ("attention.to_out.0.weight", "attn.to_out.0.weight", (512, 512)),
        ("attention.residual_conv.weight", "attn.res_conv.weight", (8, 1, 33, 1))]]
    + [("ppeg.conv_7.weight", "pos_layer.proj.weight", (512, 1, 7, 7)),
       ("ppeg.conv_5.weight", "pos_layer.proj1.weight", (512, 1, 5, 5)),
       ("ppeg.conv_3.weight", "pos_layer.proj2.weight", (512, 1, 3, 3)),
       ("norm.weight", "norm.weight", (512,)), ("head.weight", "_fc2.weight", (2, 512))],
    "clam_abmil": [("embed.0.weight", "attention_net.0.weight", (512, 1024)),
                   ("attention_tanh.0.weight", "attention_net.3.attention_a.0.weight", (256, 512)),
                   ("attention_gate.0.weight", "attention_net.3.attention_b.0.weight", (256, 512)),
                   ("attention_out.weight", "attention_net.3.attention_c.weight", (1, 256)),
                   ("head.weight", "classifiers.weight", (2, 512))],
}


def build_preset(name: str, **overrides):
    train = load_config(PRESETS / f"{name}_paper.yaml").train
    return train, create_aggregator(train.model, IN_DIM[name], N_CLASSES, **{**train.model_args, **overrides})


def test_official_counts_add_up():
    assert official_mamba_block() == MAMBA_BLOCK_512
    assert OFFICIAL_PARAMS == OFFICIAL_TOTALS


@pytest.mark.parametrize("name", sorted(OFFICIAL_TOTALS))
def test_preset_matches_the_official_architecture(name):
    text = (PRESETS / f"{name}_paper.yaml").read_text()
    repo, commit = COMMITS[name]
    assert re.search(rf"github\.com/{re.escape(repo)} @ {commit}", text), "header must pin repo and commit"
    torch.manual_seed(0)
    _, model = build_preset(name, **({"group_cache": GroupCache()} if name == "gmmamba" else {}))
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_TOTALS[name]
    params = dict(model.named_parameters())
    for ours, theirs, shape in OFFICIAL_SHAPES[name]:
        assert tuple(params[ours].shape) == shape, f"{ours} (official {theirs})"
    # It runs on a bag, as the reference would (one slide, 37 patches on a grid).
    coords = torch.stack(torch.meshgrid(torch.arange(7), torch.arange(6), indexing="ij"), -1).reshape(-1, 2)[:37]
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 37, IN_DIM[name]), coords[None] * 512)
    assert out.logits.shape == (1, N_CLASSES) and out.instance_scores.shape == (1, 37)


def test_mambamil_preset_init_and_training_recipe():
    train, model = build_preset("mambamil")
    assert [layer.mixer.orders[1].rate for layer in model.layers] == [5, 5]
    # Xavier-normal weights, zero biases, dt_proj's bias included (Mamba's own init would set it
    # to softplus⁻¹ of a dt drawn in [0.001, 0.1]: never 0).
    for i in range(2):
        for branch in range(2):
            assert model.layers[i].mixer.branches[branch].dt_proj.bias.abs().max() == 0
    assert model.layers[0].context_drop == 0 and not any(isinstance(m, torch.nn.Dropout) and m.p > 0
                                                         for m in model.modules())
    assert (train.optimizer, train.lr, train.weight_decay, train.patience, train.min_epochs, train.epochs) \
        == ("adam", 2e-4, 1e-5, 20, 52, 200)
    assert not train.standardize and train.balance == "sampler"


def test_gmmamba_preset_has_no_input_projection_and_no_mask_gradient():
    _, model = build_preset("gmmamba", group_cache=GroupCache())
    assert isinstance(model.embed, torch.nn.Identity) and not model.imm.mask_score_grad
    model.train()
    features = torch.randn(1, 40, 512)
    model(features).logits.sum().backward()
    assert model.imm.mask_score[0].weight.grad is None
    with pytest.raises(ValueError, match="in_dim \\(1024\\) must equal d_model \\(512\\)"):
        create_aggregator("gmmamba", 1024, 2, **load_config(PRESETS / "gmmamba_paper.yaml").train.model_args)


def test_abmil_attention_dropout_is_in_both_branches_and_keeps_checkpoints_loadable():
    _, clam = build_preset("clam_abmil")
    assert [type(m).__name__ for m in clam.attention_tanh] == ["Linear", "Tanh", "Dropout"]
    assert [type(m).__name__ for m in clam.attention_gate] == ["Linear", "Sigmoid", "Dropout"]
    assert clam.attention_tanh[2].p == clam.attention_gate[2].p == 0.25
    # Dropout has no parameters: a default ABMIL checkpoint loads into the CLAM recipe unchanged.
    default = create_aggregator("abmil", 1024, 2, hidden_dim=512, attention_dim=256)
    clam.load_state_dict(default.state_dict())
    features = torch.randn(1, 50, 1024)
    with torch.no_grad():
        torch.testing.assert_close(clam.eval()(features).logits, default.eval()(features).logits)
        # In training only the attention branches drop (embedding dropout off): the attention varies.
        only_attention = create_aggregator("abmil", 1024, 2, hidden_dim=512, attention_dim=256, dropout=0.0,
                                           attention_dropout=0.5).train()
        first, second = only_attention(features).instance_scores, only_attention(features).instance_scores
        assert not torch.allclose(first, second)
        plain = create_aggregator("abmil", 1024, 2, hidden_dim=512, attention_dim=256, dropout=0.0).train()
        torch.testing.assert_close(plain(features).instance_scores, plain(features).instance_scores)
    with pytest.raises(ValueError, match="attention_dropout must be in"):
        create_aggregator("abmil", 8, 2, attention_dropout=1.0)
