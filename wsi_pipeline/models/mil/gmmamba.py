"""GMMamba: group masking Mamba (Zheng et al., ICCV 2025; github titizheng/GMMamba).

    h = dropout(GELU(Linear(in_dim → d_model)))(x)   (``input_proj=False``: h = x)   (L, d)
    groups: scikit-learn KMeans (k-means++, random_state ``kmeans_seed``) on the patch coordinates,
            ``n_groups`` = min(n_groups, distinct coordinates)
    IMM, per group g (instances in bag order):
        u   = h_g + BiMamba₁(LN₁(h_g))
        s   = softmax_i(mask_score(LN(u)))                                  score MLP d → 128 → 1
        drop the max(1, ⌊mask_ratio·n⌋) lowest-scored instances (the reference's rule), but never
        all of them: at least one instance of every group is kept; the rest stay in bag order
        v   = LN(u_kept + BiMamba₂(LN₂(u_kept)))
        a   = softmax_i(group_attention(v))                                 d → 128 → 1
        t_g = Σ_i a_i v_i                                                    group token (d,)
    CSS (cross-group super-feature sampling) over T = [t_1 … t_G]:
        m = max_g T (channel-wise);  α = softmax_g(T m)                       max-guided affinity (G,)
        c = Σ_g α_g t_g;  r = MHA(query c, keys/values T)                      (8 heads, no qkv bias)
        S = α r + c                                                          super features (G, d)
    classifier: [CLS; S] → x + MHSA(x) (heads, dropout 0.1, no norm) → Linear(CLS) → logits

Faithful to the reference code except where noted:
- The reference model takes 512-d features and never calls its input projection (it builds one,
  unused); by default we project ``in_dim → d_model`` once per bag before grouping (GELU +
  dropout, as MambaMIL). ``input_proj=False`` reproduces the reference: no projection and no
  dropout, which needs ``in_dim == d_model``.
- ``mask_ratio = 0`` disables masking (the reference would still drop one instance per group).
- The hard top-k mask is not differentiable, so in the reference the mask score MLP never receives
  a gradient and keeps its random init. With ``mask_score_grad=True`` (default) the kept features are
  multiplied by ``s / s.detach()`` — exactly 1 in the forward pass — so the score MLP learns which
  instances matter; ``False`` reproduces the reference exactly.
- Without coordinates the groups are ``n_groups`` runs of consecutive instances (the reference's
  "sequential grouping").

Groups are cached per slide by a hash of the coordinate array (:mod:`.coord_groups`), so epochs
after the first do not recluster. Clustering is deterministic (``random_state=kmeans_seed``, 0 as in
the reference) but depends on the instance order (the k-means++ draws index into the bag), and each
group is scanned in bag order, so GMMamba is order-dependent like MambaMIL.

``instance_scores`` (B, L): the contribution of instance i in group g is
``a_i · w_g`` with a_i its attention inside the group and w_g the CLS token's attention to the
group's super feature in the classifier (heads averaged, CLS-to-CLS removed, renormalised over the
groups). Masked instances score 0; the scores of a bag sum to 1.

B > 1 is handled by running the bags one after another (each with its own coordinates).
``checkpoint_above`` (None: off): BiMamba layers on groups longer than this recompute their
activations in backward instead of keeping them (:class:`~.mil_layers.PreNormResidual`);
``checkpoint_chunk`` (None: off) recomputes them in pieces of that many instances, as in MambaMIL.
``init="reference"`` applies the reference's Xavier-normal / zero-bias init to the IMM part (input
projection, BiMambas, score and attention MLPs), as the reference does; ``"mamba"`` (default) keeps
Mamba's init. CSS and the classifier keep PyTorch's default init in both cases, as in the reference.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .coord_groups import DEFAULT_GROUP_CACHE, GroupCache, contiguous_groups
from .mil_layers import PreNormResidual, TanhAttentionPool, build_mixer, init_weights
from .registry import MILOutput, check_coord_dims, register_aggregator

LICENSE = "Apache-2.0"  # this implementation (written here from the paper); no weights are shipped


class IntraGroupMaskingMamba(nn.Module):
    """IMM: BiMamba → score → drop the lowest-scored instances → BiMamba → attention pooling.

    forward(h (1, n, d)) → (group token (1, d), kept indices (k,) int64, attention over kept (1, k)).
    """

    def __init__(self, d_model: int, mask_ratio: float, d_state: int, d_conv: int, expand: float,
                 attention_dim: int = 128, mask_score_grad: bool = True, checkpoint_above: int | None = None,
                 checkpoint_chunk: int | None = None):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.mask_score_grad = mask_score_grad
        mixer = dict(d_state=d_state, d_conv=d_conv, expand=expand, checkpoint_above=checkpoint_above)
        self.bimamba_1 = PreNormResidual(d_model, build_mixer("bimamba", d_model, **mixer),
                                         checkpoint_above=checkpoint_above, checkpoint_chunk=checkpoint_chunk)
        self.bimamba_2 = PreNormResidual(d_model, build_mixer("bimamba", d_model, **mixer),
                                         checkpoint_above=checkpoint_above, checkpoint_chunk=checkpoint_chunk)
        # One LayerNorm before both the mask score and the group attention, as in the reference.
        self.norm = nn.LayerNorm(d_model)
        self.mask_score = nn.Sequential(nn.Linear(d_model, attention_dim), nn.Tanh(), nn.Linear(attention_dim, 1))
        self.group_attention = TanhAttentionPool(d_model, attention_dim)

    def n_dropped(self, n_instances: int) -> int:
        if self.mask_ratio == 0.0:
            return 0
        return min(max(1, int(self.mask_ratio * n_instances)), n_instances - 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_instances = h.shape[1]
        u = self.bimamba_1(h)
        n_drop = self.n_dropped(n_instances)
        if n_drop:
            scores = torch.softmax(self.mask_score(self.norm(u)).squeeze(-1), dim=1)[0]   # (n,)
            kept = torch.topk(scores, n_instances - n_drop).indices.sort().values
            u = u[:, kept]
            if self.mask_score_grad:
                kept_scores = scores[kept]
                u = u * (kept_scores / kept_scores.detach())[None, :, None]
        else:
            kept = torch.arange(n_instances, device=h.device)
        v = self.norm(self.bimamba_2(u))
        token, attention = self.group_attention(v)
        return token, kept, attention


class CrossGroupSuperFeatures(nn.Module):
    """CSS: max-guided softmax mixing of group tokens + multi-head attention: (1, G, d) → (1, G, d)."""

    def __init__(self, d_model: int, n_heads: int = 8):
        super().__init__()
        self.refine = nn.MultiheadAttention(d_model, n_heads, bias=False, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        max_feature = tokens.amax(dim=1, keepdim=True)                           # (1, 1, d)
        # Unscaled dot products, as in the reference: the affinity is close to one-hot on the group
        # most aligned with the channel-wise maximum.
        affinity = torch.softmax(tokens @ max_feature.transpose(1, 2), dim=1)    # (1, G, 1)
        cross = affinity.transpose(1, 2) @ tokens                                 # (1, 1, d)
        refined, _ = self.refine(cross, tokens, tokens, need_weights=False)       # (1, 1, d)
        return affinity @ refined + cross                                         # (1, G, d)


class ClassTokenAttention(nn.Module):
    """Residual multi-head self-attention without normalisation (the reference's AttenLayer).

    forward(x (1, N, d)) → (x + attention(x), CLS row of the attention averaged over heads (1, N)).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.scale = (d_model // n_heads) ** -0.5
        self.to_qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.to_out = nn.Sequential(nn.Linear(d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n_tokens, d_model = x.shape
        q, k, v = (t.reshape(batch, n_tokens, self.n_heads, -1).transpose(1, 2)
                   for t in self.to_qkv(x).chunk(3, dim=-1))                    # (B, heads, N, dh)
        attention = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)  # (B, heads, N, N)
        out = (self.dropout(attention) @ v).transpose(1, 2).reshape(batch, n_tokens, d_model)
        return x + self.to_out(out), attention[:, :, 0].mean(dim=1)


class GMMamba(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, d_model: int = 512, n_groups: int = 10,
                 mask_ratio: float = 0.3, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dropout: float = 0.25, n_heads: int = 8, attention_dropout: float = 0.1, n_cls_layers: int = 1,
                 attention_dim: int = 128, mask_score_grad: bool = True, kmeans_seed: int = 0,
                 init: str = "mamba", group_cache: GroupCache | None = None, input_proj: bool = True,
                 checkpoint_above: int | None = None, checkpoint_chunk: int | None = None):
        super().__init__()
        if n_groups < 1 or n_cls_layers < 1:
            raise ValueError("n_groups and n_cls_layers must be >= 1")
        if not input_proj and in_dim != d_model:
            raise ValueError(f"gmmamba: input_proj=False feeds the features to the model as they are, so "
                             f"in_dim ({in_dim}) must equal d_model ({d_model}) (the reference: 512-d features)")
        self.n_groups, self.kmeans_seed = n_groups, kmeans_seed
        self.group_cache = group_cache if group_cache is not None else DEFAULT_GROUP_CACHE
        self.embed = (nn.Sequential(nn.Linear(in_dim, d_model), nn.GELU(), nn.Dropout(dropout)) if input_proj
                      else nn.Identity())
        self.imm = IntraGroupMaskingMamba(d_model, mask_ratio, d_state, d_conv, expand, attention_dim,
                                          mask_score_grad, checkpoint_above, checkpoint_chunk)
        self.css = CrossGroupSuperFeatures(d_model, n_heads)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d_model))
        self.cls_layers = nn.ModuleList(ClassTokenAttention(d_model, n_heads, attention_dropout)
                                        for _ in range(n_cls_layers))
        self.head = nn.Linear(d_model, n_classes)
        init_weights(self.embed, init)
        init_weights(self.imm, init)

    def groups(self, n_instances: int, coords: torch.Tensor | None) -> list[torch.Tensor]:
        """Index tensors of the groups of one bag; coords (L, k) or None."""
        if coords is None:
            groups = contiguous_groups(n_instances, self.n_groups)
        else:
            groups = self.group_cache.groups(coords.detach().cpu().numpy(), min(self.n_groups, n_instances),
                                             self.kmeans_seed)
        return [torch.from_numpy(np.asarray(g, dtype=np.int64)) for g in groups]

    def forward_bag(self, h: torch.Tensor, coords: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """h (1, L, d) embedded instances → logits (1, C), instance_scores (1, L)."""
        n_instances = h.shape[1]
        tokens, kept_index, kept_attention = [], [], []
        groups = self.groups(n_instances, coords)
        # One host-to-device copy for all groups: a copy from pageable memory waits for the GPU to
        # finish the work queued before it, so one per group stalled the loop once per group.
        for group in torch.cat(groups).to(h.device).split([len(g) for g in groups]):
            token, kept, attention = self.imm(h[:, group])
            tokens.append(token)
            kept_index.append(group[kept])
            kept_attention.append(attention[0])
        x = torch.cat([self.cls_token, self.css(torch.stack(tokens, dim=1))], dim=1)   # (1, 1 + G, d)
        for layer in self.cls_layers:
            x, cls_attention = layer(x)
        logits = self.head(x[:, 0])
        group_weight = cls_attention[0, 1:]
        group_weight = group_weight / group_weight.sum()
        contributions = torch.cat([a * w for a, w in zip(kept_attention, group_weight)])
        scores = h.new_zeros(n_instances).index_put((torch.cat(kept_index),), contributions)
        return logits, scores[None]

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        """features (B, L, D), coords (B, L, k) (k = 2 level-0 px, 3 voxels) or None → logits (B, C),
        instance_scores (B, L). Groups are k-means clusters in k dimensions."""
        check_coord_dims(coords, (2, 3), "gmmamba")
        h = self.embed(features)
        results = [self.forward_bag(h[b:b + 1], None if coords is None else coords[b]) for b in range(h.shape[0])]
        return MILOutput(logits=torch.cat([r[0] for r in results]),
                         instance_scores=torch.cat([r[1] for r in results]))


# k-means groups work in any number of coordinate dimensions, so volumes (k = 3) group in 3-D.
@register_aggregator("gmmamba", coord_dims=(2, 3), uses_coords=True, out_dim="n_classes", license=LICENSE,
                     reference="Zheng et al., ICCV 2025 (GMMamba); github.com/titizheng/GMMamba")
def gmmamba(in_dim: int, n_classes: int, **cfg) -> GMMamba:
    return GMMamba(in_dim, n_classes, **cfg)
