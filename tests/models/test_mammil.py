"""MamMIL: our forward equals the official model code for the same weights; graph orders follow the
official networkx builder; parameter counts equal the official model's.

Official code: github.com/Vison307/MamMIL @ 64736e1a (models/MamMIL2.py, h5toPyG.ipynb ``pt2graph``,
mamba/mamba_ssm/modules/direct_mamba.py, mamba/mamba_ssm/ops/triton/ssd_combined.py
``mamba_split_conv1d_scan_ref`` / ``ssd_selective_scan``, ops/triton/layernorm_gated.py
``rms_norm_ref``) and torch_geometric 2.5.2's GENConv / DeepGCNLayer / to_networkx. None of it can be
imported here (Triton, CUDA-only mamba-ssm, torch_geometric), so the pure-PyTorch parts are
transliterated below, line for line where they compute something; mamba_ssm is not imported.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsi_pipeline.models.mil import create_aggregator
from wsi_pipeline.models.mil.genconv import GENConv
from wsi_pipeline.run.config import load_config
from wsi_pipeline.models.mil.graph_orders import (GraphCache, build_patch_graph, components, cosine_distance_weights,
                                                  knn_edges, seeded_roots)
from wsi_pipeline.models.mil.mammil import scan_orders
from wsi_pipeline.ssm import Explicit
from wsi_pipeline.ssm.mamba2_block import MultiOrderMamba2

from .small_models import grid_coords

SMALL = dict(d_model=16, d_state=8, headdim=8, expand=2)
PRESETS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "models"


# ---- transliterated official code (fp64 throughout) ------------------------------------------

def official_selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus):
    """mamba-ssm selective_scan_ref, real A, B/C (b, g=1, n, l), no z: the sequential recurrence."""
    delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    B, C = B[:, 0], C[:, 0]
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = torch.exp(delta[:, :, i, None] * A) * x + delta[:, :, i, None] * B[:, None, :, i] * u[:, :, i, None]
        ys.append((x * C[:, None, :, i]).sum(-1))
    return torch.stack(ys, dim=2) + u * D[:, None]


def official_ssd_selective_scan(x, dt, A, B, C, D, dt_bias):
    """ssd_combined.ssd_selective_scan with dt_softplus, default dt_limit: broadcast, then Mamba-1."""
    batch, seqlen, nheads, headdim = x.shape
    _, _, ngroups, dstate = B.shape
    x = x.permute(0, 2, 3, 1).reshape(batch, nheads * headdim, seqlen)                  # b (h p) l
    dt = dt[..., None].expand(-1, -1, -1, headdim).permute(0, 2, 3, 1).reshape(batch, -1, seqlen)
    A = A[:, None, None].expand(nheads, headdim, dstate).reshape(-1, dstate)             # (h p) n
    B, C = B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1)                                  # b g n l
    D = D[:, None].expand(nheads, headdim).reshape(-1)
    dt_bias = dt_bias[:, None].expand(nheads, headdim).reshape(-1)
    out = official_selective_scan(x, dt, A, B, C, D, dt_bias, True)
    return out.reshape(batch, nheads, headdim, seqlen).permute(0, 3, 1, 2)               # b l h p


def official_causal_conv1d(x, weight, bias):
    """causal_conv1d_ref with activation silu: x (b, d, l)."""
    out = F.conv1d(x, weight[:, None], bias, padding=weight.shape[1] - 1, groups=x.shape[1])[..., :x.shape[-1]]
    return F.silu(out)


def official_rms_norm(x, weight, z, eps, group_size):
    """layernorm_gated.rms_norm_ref, norm_before_gate=False."""
    x = x * F.silu(z)
    groups = x.reshape(*x.shape[:-1], -1, group_size)
    rstd = 1 / torch.sqrt(groups.square().mean(dim=-1, keepdim=True) + eps)
    return (groups * rstd).reshape(x.shape) * weight


def official_split_conv1d_scan_ref(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, rmsnorm_weight,
                                   rmsnorm_eps, headdim, ngroups=1):
    """ssd_combined.mamba_split_conv1d_scan_ref (outproj None, norm_before_gate False)."""
    nheads = D.shape[0]
    batch, seqlen, _ = zxbcdt.shape
    dim = nheads * headdim
    dstate = (zxbcdt.shape[-1] - 2 * dim - nheads) // ngroups // 2
    assert zxbcdt.shape == (batch, seqlen, 2 * dim + 2 * ngroups * dstate + nheads)
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = official_causal_conv1d(xBC.transpose(1, 2), conv1d_weight, conv1d_bias).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.reshape(batch, seqlen, nheads, headdim)
    B = B.reshape(batch, seqlen, ngroups, dstate)
    C = C.reshape(batch, seqlen, ngroups, dstate)
    out = official_ssd_selective_scan(x, dt, A, B, C, D, dt_bias).reshape(batch, seqlen, dim)
    return official_rms_norm(out, rmsnorm_weight, z, rmsnorm_eps, dim // ngroups)


def official_direct_mamba(mixer, u, order_index_list):
    """DirectMamba.forward (use_mem_eff_path, bidirectional): the mean of 8 ordered SSMs, out_proj."""
    zxbcdt = F.linear(u, mixer.in_proj.weight)
    A_list = [-torch.exp(A_log) for A_log in mixer.A_log_list]
    out_list = []
    for i in range(mixer.n_ssms):
        order_index = order_index_list[i // 2]
        if i % 2 == 1:
            order_index = order_index.flip(0)
        out = official_split_conv1d_scan_ref(
            zxbcdt[:, order_index], mixer.conv1d_list[i].weight[:, 0], mixer.conv1d_list[i].bias,
            mixer.dt_bias_list[i], A_list[i], mixer.D_list[i], mixer.norm.weight, mixer.norm.eps, mixer.headdim)
        out_list.append(out[:, torch.argsort(order_index)])
    return F.linear(torch.stack(out_list).mean(0), mixer.out_proj.weight)


def official_genconv(conv, x, edge_index):
    """torch_geometric GENConv (aggr softmax, learn_t, no edge_attr, in = out): for each target i,
    softmax over its incoming messages ReLU(x_j) + 1e-7 per channel, weighted sum, + x_i, MLP."""
    out = torch.zeros_like(x)
    source, target = edge_index.tolist()
    for i in range(x.shape[-2]):
        incoming = [s for s, t in zip(source, target) if t == i]
        if incoming:
            messages = F.relu(x[..., incoming, :]) + 1e-7
            alpha = torch.softmax(messages * conv.t, dim=-2)
            out[..., i, :] = (alpha * messages).sum(-2)
    return conv.mlp(out + x)


def official_mammil_forward(model, features, edge_index, order_index_list):
    """MamMIL2.forward: ``zip(self.layers, self.ppeg)``, graph block where idx < len(layers) − 1.
    The "as described" variant runs every layer (the zip over a shorter ppeg list removed)."""
    h = model.embed(features)
    n_built = len(model.layers)
    for idx in range(model.active_layers):
        h_ = h
        h = model.layers[idx][0](h)
        h = official_direct_mamba(model.layers[idx][1], h, order_index_list)
        if idx < n_built - 1:
            block = model.graph_blocks[idx]
            # DeepGCNLayer block='res': conv, norm, act, x + h, dropout (eval: identity)
            h = h + F.relu(block.norm(official_genconv(block.conv, h, edge_index)))
        h = h + h_
    h = model.norm(h)
    A = torch.softmax(model.attention.score(h).transpose(1, 2), dim=-1)
    return model.head(torch.bmm(A, h).squeeze(0)), A[:, 0]


def randomise(module):
    """Non-trivial values for every parameter (zero biases / unit norms would hide index mistakes)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.numel() > 1 else 0.0))


# ---- the SSD mixer ----------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["chunked", "scan"])
@pytest.mark.parametrize("length", [1, 5, 70])
def test_mixer_equals_official_split_conv1d_scan_ref(impl, length):
    torch.manual_seed(0)
    mixer = MultiOrderMamba2(16, n_ssms=8, d_state=8, headdim=8, impl=impl).double()
    randomise(mixer)
    generator = torch.Generator().manual_seed(length)
    u = torch.randn(2, length, 16, dtype=torch.float64)
    indices = [torch.arange(length)] + [torch.randperm(length, generator=generator) for _ in range(3)]
    orders = []
    for index in indices:
        orders += [Explicit(index), Explicit(index, reverse=True)]
    ours = mixer(u, orders)
    torch.testing.assert_close(ours, official_direct_mamba(mixer, u, indices), rtol=1e-10, atol=1e-10)


def test_chunked_ssd_crosses_chunks_and_backpropagates_like_the_scan():
    torch.manual_seed(0)
    u = torch.randn(1, 150, 16, dtype=torch.float64, requires_grad=True)   # 3 chunks of 64
    grads = []
    for impl in ("chunked", "scan"):
        torch.manual_seed(2)
        mixer = MultiOrderMamba2(16, n_ssms=1, d_state=8, headdim=8, impl=impl).double()
        u.grad = None
        mixer(u, [Explicit(torch.arange(150))]).square().sum().backward()
        grads.append((u.grad.clone(), mixer.A_log_list[0].grad.clone(), mixer.in_proj.weight.grad.clone()))
    for chunked, scanned in zip(*grads):
        torch.testing.assert_close(chunked, scanned, rtol=1e-9, atol=1e-9)


# ---- graph orders -----------------------------------------------------------------------------

def test_knn_is_exact_with_ties_broken_by_index():
    coords = np.array([[x, y] for y in range(4) for x in range(5)]) * 256          # 5 x 4 grid
    edges = knn_edges(coords, 8)
    assert edges.shape == (2, 20 * 8) and (edges[0] != edges[1]).all()
    # Interior patch (1, 1) = index 6: its 8-neighbourhood exactly, nearest (distance 1) first.
    neighbours = edges[1, edges[0] == 6].tolist()
    assert neighbours == [1, 5, 7, 11, 0, 2, 10, 12]
    # Corner 0: 1, 5 (d 1), 6 (√2), then d 2: 2, 10, then √5: 7, 11, then ... (index order in ties)
    assert edges[1, edges[0] == 0].tolist() == [1, 5, 6, 2, 10, 7, 11, 12]
    brute = np.argsort(((coords[:, None] - coords[None]) ** 2).sum(-1) + np.eye(20) * 1e18, axis=1, kind="stable")
    assert np.array_equal(edges[1].reshape(20, 8), brute[:, :8])
    assert knn_edges(coords[:3], 8).shape == (2, 6)                              # L − 1 neighbours
    assert knn_edges(coords[:1], 8).shape == (2, 0)


def networkx_orders(coords, features, roots):
    """pt2graph's orders with networkx (PyG's to_networkx(to_undirected=True) transliterated: the
    directed edges u → v with u <= v only, in edge order), BFS from the given roots."""
    nx = pytest.importorskip("networkx")
    edge_index = knn_edges(coords, 8)
    weights = cosine_distance_weights(features, edge_index)      # float32, as edge_weight
    g = nx.Graph()
    g.add_nodes_from(range(len(coords)))
    for i, (u, v) in enumerate(edge_index.T.tolist()):
        if u > v:
            continue
        g.add_edge(u, v)
        g[u][v]["edge_weight"] = weights.tolist()[i]
    tree = nx.minimum_spanning_tree(g, weight="edge_weight")
    post = list(nx.dfs_postorder_nodes(tree))
    pre = list(nx.dfs_preorder_nodes(tree))
    bfs = []
    parts = sorted(nx.connected_components(tree), key=min)
    assert [min(p) for p in parts] == [min(p) for p in nx.connected_components(tree)]
    for part, root in zip(parts, roots):
        sub = tree.subgraph(part)
        assert root in part
        bfs += [root] + [t for (s, t) in nx.bfs_edges(sub, root)]
    return pre, post, bfs


@pytest.mark.parametrize("case", ["grid", "two_pieces", "duplicates"])
def test_orders_follow_the_official_networkx_builder(case):
    generator = torch.Generator().manual_seed(3)
    coords = grid_coords(60, 10, generator).numpy()
    if case == "two_pieces":     # two tissue pieces far apart: a spanning forest, two BFS roots
        coords = np.concatenate([coords[:30], coords[30:] + 10**6])
    if case == "duplicates":
        coords[10:20] = coords[:10]
    features = np.random.default_rng(0).normal(size=(60, 12))
    graph = build_patch_graph(coords, features, bfs_seed=5)
    from wsi_pipeline.models.mil.graph_orders import spanning_tree_adjacency
    adjacency = spanning_tree_adjacency(60, graph.edge_index, cosine_distance_weights(features, graph.edge_index))
    roots = seeded_roots(components(adjacency), 5)
    pre, post, bfs = networkx_orders(coords, features, roots)
    assert graph.dfs_preorder.tolist() == pre
    assert graph.dfs_postorder.tolist() == post
    assert graph.bfs.tolist() == bfs
    assert len(roots) == (2 if case == "two_pieces" else len(roots))
    for order in graph.orders:
        assert sorted(order.tolist()) == list(range(60))


def test_bfs_root_is_seeded_and_cache_reuses_graphs():
    coords = grid_coords(50, 9, torch.Generator().manual_seed(0)).numpy()
    features = np.random.default_rng(1).normal(size=(50, 6)).astype(np.float32)
    assert np.array_equal(build_patch_graph(coords, features, bfs_seed=0).bfs,
                          build_patch_graph(coords, features, bfs_seed=0).bfs)
    assert any(not np.array_equal(build_patch_graph(coords, features, bfs_seed=0).bfs,
                                  build_patch_graph(coords, features, bfs_seed=s).bfs) for s in range(1, 4))
    cache = GraphCache()
    for _ in range(3):
        cache.graph(coords, features)
    cache.graph(coords, features + 1)            # other features: other edge weights, other tree
    assert (cache.misses, cache.hits, len(cache)) == (2, 2, 2)


# ---- GENConv ----------------------------------------------------------------------------------

def test_genconv_equals_pyg_softmax_aggregation():
    torch.manual_seed(0)
    conv = GENConv(6).double()
    randomise(conv)
    x = torch.randn(1, 30, 6, dtype=torch.float64)
    edges = torch.from_numpy(knn_edges(grid_coords(30, 7, torch.Generator().manual_seed(0)).numpy(), 8))
    edges = edges[:, edges[1] != 3]                # node 3 receives nothing: aggregation 0
    torch.testing.assert_close(conv(x, edges), official_genconv(conv, x, edges), rtol=1e-10, atol=1e-10)
    conv(x, edges).sum().backward()
    assert conv.t.grad is not None and conv.t.grad.abs() > 0      # learnable temperature


# ---- the whole model --------------------------------------------------------------------------

@pytest.mark.parametrize("active_layers", [1, 2], ids=["as_run", "as_described"])
def test_model_equals_official_forward(active_layers):
    torch.manual_seed(0)
    model = create_aggregator("mammil", 10, 3, n_layers=2, active_layers=active_layers, graph_cache=GraphCache(),
                              **SMALL).double().eval()
    randomise(model)
    coords = grid_coords(40, 8, torch.Generator().manual_seed(0))
    features = torch.randn(1, 40, 10, dtype=torch.float64)
    with torch.no_grad():
        ours = model(features, coords[None])
        graph = model.graph(features[0], coords)
        logits, attention = official_mammil_forward(model, features, torch.from_numpy(graph.edge_index),
                                                    [torch.from_numpy(o) for o in graph.orders])
    torch.testing.assert_close(ours.logits, logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.instance_scores, attention, rtol=1e-9, atol=1e-9)
    assert len(scan_orders(graph)) == 8


def official_parameter_count(in_dim, n_classes, d=512, layer_n=2, d_state=128, d_conv=4, expand=2, headdim=64):
    """MamMIL2.__init__ counted by hand: ft_head, layer_n × (LayerNorm + DirectMamba), layer_n − 1 ×
    DeepGCNLayer(GENConv(d, d, num_layers=2, norm='layer', learn_t), LayerNorm), norm, attention, head."""
    d_inner, nheads = expand * d, expand * d // headdim
    conv_dim = d_inner + 2 * d_state
    direct_mamba = (d * (2 * d_inner + 2 * d_state + nheads)                # in_proj, no bias
                    + 8 * (conv_dim * d_conv + conv_dim + 3 * nheads)      # per SSM: conv, dt_bias, A_log, D
                    + d_inner + d_inner * d)                                # RMSNorm weight, out_proj
    genconv = (d * 2 * d + 2 * d) + 2 * (2 * d) + (2 * d * d + d) + 1       # MLP (Linear, LN, Linear), t
    deep_gcn_layer = genconv + 2 * d
    return ((in_dim * d + d) + layer_n * (2 * d + direct_mamba) + (layer_n - 1) * deep_gcn_layer + 2 * d
            + (d * 128 + 128 + 128 + 1) + (d * n_classes + n_classes))


OFFICIAL_TOTAL_1024_2 = 5_177_348     # official_parameter_count(1024, 2), the model as upstream builds it


@pytest.mark.parametrize("preset, active", [("mammil_paper", 1), ("mammil_described", 2)])
def test_presets_build_the_official_model(preset, active):
    assert official_parameter_count(1024, 2) == OFFICIAL_TOTAL_1024_2
    text = (PRESETS / f"{preset}.yaml").read_text()
    assert "github.com/Vison307/MamMIL @ 64736e1" in text
    train = load_config(PRESETS / f"{preset}.yaml").train
    assert (train.optimizer, train.lr, train.weight_decay) == ("radam", 1e-4, 0.05)
    model = create_aggregator(train.model, 1024, 2, **train.model_args)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_TOTAL_1024_2
    assert model.active_layers == active
    mixer = model.layers[0][1]
    assert (mixer.in_proj.weight.shape, mixer.conv1d_list[7].weight.shape, mixer.A_log_list[0].shape) \
        == ((2320, 512), (1280, 1, 4), (16,))


def test_reference_init():
    torch.manual_seed(0)
    model = create_aggregator("mammil", 64, 2, d_model=64, d_state=16, headdim=16)
    assert torch.equal(model.embed[0].bias, torch.zeros(64)) and torch.equal(model.head.bias, torch.zeros(2))
    assert abs(float(model.head.weight.detach().std()) - 0.02) < 0.006           # trunc_normal(std 0.02)
    assert model.graph_blocks[0].conv.mlp[0].bias.abs().sum() > 0        # PyG Linear: not re-initialised
    bound = 1 / math.sqrt(128) / math.sqrt(2)                             # kaiming_uniform(a=√5) / √n_layer
    assert model.layers[0][1].out_proj.weight.abs().max() <= bound
    a = torch.exp(model.layers[0][1].A_log_list[0])
    assert (a >= 1).all() and (a <= 16).all()


def test_rejects_3d_coords_and_bad_layer_counts():
    model = create_aggregator("mammil", 8, 2, graph_cache=GraphCache(), **SMALL)
    with pytest.raises(ValueError, match="mammil takes coords"):
        model(torch.randn(1, 5, 8), torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="active_layers"):
        create_aggregator("mammil", 8, 2, n_layers=1, active_layers=2, **SMALL)
