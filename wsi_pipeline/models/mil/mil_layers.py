"""Building blocks shared by the Mamba MIL aggregators (MambaMIL, GMMamba, FMaMIL).

- :func:`build_mixer`: the sequence mixer of one layer — ``"srmamba"`` (forward + stride-reordered
  branch, MambaMIL's SRMamba), ``"bimamba"`` (forward + reversed branch) or ``"mamba"`` (one scan).
- :class:`PreNormResidual`: ``x + mixer(LayerNorm(x))``, the layer MambaMIL stacks; optionally
  with activation checkpointing for long bags (``checkpoint_above``).
- :class:`TanhAttentionPool`: ABMIL's ungated attention, ``w · tanh(V h)``, softmax over instances.
- :func:`init_weights`: the two initialisation schemes the Mamba MIL models offer (see there).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from wsi_pipeline.ssm import BranchedMambaBlock, Identity, MambaBlock, Reverse, Stride
from wsi_pipeline.ssm.chunked import chunked_mixer, supports_chunking

MIXERS = ("srmamba", "bimamba", "mamba")
INIT_SCHEMES = ("mamba", "reference")


def build_mixer(kind: str, d_model: int, rate: int = 10, d_state: int = 16, d_conv: int = 4,
                expand: float = 2, checkpoint_above: int | None = None) -> nn.Module:
    """(B, L, d_model) → (B, L, d_model) mixer; ``rate`` is used by ``"srmamba"`` only.

    SRMamba and BiMamba have one in_proj/out_proj and separate SSM parameters (conv, x_proj,
    dt_proj, A, D) per scan order, summed before out_proj, as in MambaMIL's reference code.
    ``checkpoint_above``: for longer sequences each branch is recomputed in backward
    (:class:`~wsi_pipeline.ssm.BranchedMambaBlock`).
    """
    if kind == "srmamba":
        return BranchedMambaBlock(d_model, [Identity(), Stride(rate)], d_state=d_state, d_conv=d_conv,
                                  expand=expand, checkpoint_above=checkpoint_above)
    if kind == "bimamba":
        return BranchedMambaBlock(d_model, [Identity(), Reverse()], d_state=d_state, d_conv=d_conv,
                                  expand=expand, checkpoint_above=checkpoint_above)
    if kind == "mamba":
        return MambaBlock(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    raise ValueError(f"mixer must be one of {MIXERS}, got {kind!r}")


# Why hold the context branch back: with few training slides the Mamba mixer's hidden state sees
# every instance of the bag, so each instance's output can carry the slide's identity (stain, its
# mix of confounders) and the model fits the training bags by memorising slides before attention
# finds the few lesion patches. On the hard demo (lesions of 1-4 of ~116 patches) FMaMIL without its
# mixer layers reaches test AUC 1.0 on a fold where the full model stays at chance and its
# validation loss rises from epoch 1 (BENCHMARKS.md).
class PreNormResidual(nn.Module):
    """``x + gamma ⊙ mixer(LayerNorm(x))``: (B, L, d_model) → (B, L, d_model).

    The context branch can be held back so the model keeps an instance-wise path (comment
    above): ``layer_scale`` (None: no gamma, the reference design) is the initial
    value of a learnable per-channel gamma (LayerScale; 0 starts the layer as the identity, every
    instance is then its own embedding until the gradient makes context useful); ``context_drop``
    is the probability, per bag and training pass, that the branch is skipped (stochastic depth;
    the kept branch is not rescaled, so eval needs no correction), so the instance path alone must
    classify the bag on those passes.

    ``checkpoint_above`` (None: never): when a bag has more instances than this and gradients are
    on, the branch's activations are not kept for backward but recomputed there
    (``torch.utils.checkpoint``), so only the layer input stays in memory between forward and
    backward. Same values and gradients; one more forward of the branch in time.

    ``checkpoint_chunk`` (None: off; needs ``checkpoint_above``): when checkpointing applies, the
    layer is recomputed in pieces of this many steps along each scan branch, the scan state and the
    conv's last inputs carried from piece to piece (:func:`~wsi_pipeline.ssm.chunked.chunked_mixer`),
    so not even one layer's whole-sequence activations are held: the peak no longer grows with the
    mixer's width times L, only with the layer's input and output (benchmarks/results/scan_round2.md).
    Same values and gradients up to float rounding. Mamba mixers only (srmamba, bimamba, mamba).
    """

    def __init__(self, d_model: int, mixer: nn.Module, layer_scale: float | None = None,
                 context_drop: float = 0.0, checkpoint_above: int | None = None,
                 checkpoint_chunk: int | None = None):
        super().__init__()
        if not 0.0 <= context_drop < 1.0:
            raise ValueError(f"context_drop must be in [0, 1), got {context_drop}")
        if checkpoint_above is not None and checkpoint_above < 0:
            raise ValueError(f"checkpoint_above must be None or >= 0, got {checkpoint_above}")
        if checkpoint_chunk is not None:
            if checkpoint_chunk < 1:
                raise ValueError(f"checkpoint_chunk must be None or >= 1, got {checkpoint_chunk}")
            if not supports_chunking(mixer):
                raise ValueError(f"checkpoint_chunk needs a Mamba mixer, got {type(mixer).__name__}")
        self.checkpoint_above = checkpoint_above
        self.checkpoint_chunk = checkpoint_chunk
        self.norm = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.context_drop = context_drop
        self.gamma = None if layer_scale is None else nn.Parameter(torch.full((d_model,), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.context_drop > 0:
            keep = (torch.rand(x.shape[0], 1, 1, device=x.device) >= self.context_drop).to(x.dtype)
            if not keep.any():
                return x
        else:
            keep = None
        if checkpointing(self.checkpoint_above, x):
            branch = (chunked_mixer(self.norm, self.mixer, x, self.checkpoint_chunk) if self.checkpoint_chunk
                      else checkpoint(self._branch, x, use_reentrant=False))
        else:
            branch = self._branch(x)
        if self.gamma is not None:
            branch = branch * self.gamma
        return x + branch if keep is None else x + keep * branch

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer(self.norm(x))


def checkpointing(above: int | None, x: torch.Tensor) -> bool:
    """Whether to checkpoint a (B, L, d) input: an option is set, L exceeds it and autograd records."""
    return above is not None and x.shape[1] > above and torch.is_grad_enabled()


class TanhAttentionPool(nn.Module):
    """Attention pooling ``A = softmax_i(w · tanh(V h_i))`` (Linear d→hidden, Tanh, Linear hidden→1).

    forward(h (B, L, d)) → (pooled (B, d), attention (B, L)); attention rows sum to 1.
    """

    def __init__(self, d_model: int, hidden_dim: int = 128):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(d_model, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = torch.softmax(self.score(h).squeeze(-1), dim=1)        # (B, L)
        return torch.einsum("bl,bld->bd", attention, h), attention


def init_weights(module: nn.Module, scheme: str) -> None:
    """Re-initialise ``module``'s nn.Linear layers in place.

    - ``"reference"``: what MambaMIL's (and GMMamba's) reference code does with
      ``self.apply(initialize_weights)``: every nn.Linear gets ``xavier_normal_`` weights and a zero
      bias, *including* the SSM's ``x_proj``/``dt_proj`` and the ``dt_proj`` bias. The reference
      ignores mamba-ssm's ``_no_reinit`` flag, so after this all initial step sizes are
      softplus(0) = ln 2 ≈ 0.69 instead of Mamba's log-uniform [0.001, 0.1]. Reproduced on purpose.
      LayerNorms are (1, 0) as constructed; convolutions, A_log and D keep Mamba's init.
    - ``"mamba"``: mamba-ssm's convention: weights keep their construction init (PyTorch default for
      the MIL layers, Mamba's own init inside the SSM blocks) and Linear biases are zeroed, except
      those flagged ``_no_reinit`` (the dt_proj bias, Mamba's inverse-softplus dt init).
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {INIT_SCHEMES}, got {scheme!r}")
    for layer in module.modules():
        if not isinstance(layer, nn.Linear):
            continue
        if scheme == "reference":
            nn.init.xavier_normal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif layer.bias is not None and not getattr(layer.bias, "_no_reinit", False):
            nn.init.zeros_(layer.bias)
