"""chunked_mixer: a Mamba layer recomputed in pieces along each scan order, carrying the scan state and
the conv inputs, gives the unchunked layer's output and gradients (input and every parameter)."""

import pytest
import torch
from torch import nn

from wsi_pipeline.ssm import BranchedMambaBlock, Identity, MambaBlock, Reverse, Stride
from wsi_pipeline.ssm.chunked import chunked_mixer

D_MODEL, SEQLEN = 8, 23


def make_mixer(kind):
    torch.manual_seed(0)
    if kind == "srmamba":       # rate 3 does not divide 23: the stride branch has padded rows
        mixer = BranchedMambaBlock(D_MODEL, [Identity(), Stride(3)], d_state=4, expand=1.5, dt_rank=2)
    elif kind == "bimamba":
        mixer = BranchedMambaBlock(D_MODEL, [Identity(), Reverse()], d_state=4, expand=1, bias=True)
    else:
        mixer = MambaBlock(D_MODEL, d_state=4, expand=1)
    norm = nn.LayerNorm(D_MODEL)
    with torch.no_grad():   # non-trivial LayerNorm parameters, so their gradients are checked too
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    return norm.double(), mixer.double()


def outputs_and_grads(fn, norm, mixer, x, grad):
    x = x.detach().requires_grad_()
    out = fn(x)
    params = [p for p in (*norm.parameters(), *mixer.parameters())]
    grads = torch.autograd.grad(out, [x, *params], grad)
    return out.detach(), grads


@pytest.mark.parametrize("kind", ["srmamba", "bimamba", "mamba"])
@pytest.mark.parametrize("chunk", [1, 5, SEQLEN + 4])
def test_chunked_mixer_matches_the_whole_layer(kind, chunk):
    norm, mixer = make_mixer(kind)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, SEQLEN, D_MODEL, generator=gen, dtype=torch.float64)
    grad = torch.randn(2, SEQLEN, D_MODEL, generator=gen, dtype=torch.float64)
    whole = outputs_and_grads(lambda t: mixer(norm(t)), norm, mixer, x, grad)
    pieces = outputs_and_grads(lambda t: chunked_mixer(norm, mixer, t, chunk), norm, mixer, x, grad)
    torch.testing.assert_close(pieces[0], whole[0], rtol=1e-10, atol=1e-10)
    names = ["x"] + [f"norm.{n}" for n, _ in norm.named_parameters()] + [n for n, _ in mixer.named_parameters()]
    for name, got, want in zip(names, pieces[1], whole[1]):
        assert got is not None, name
        # A_log, D and dt_proj.bias enter the scan as .float() (as in Mamba), so their gradients are
        # fp32 sums in a different order: ~5e-8 relative; everything else agrees to ~1e-15.
        fp32 = name.endswith(("A_log", "D", "dt_proj.bias"))
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-6 if fp32 else 1e-10,
                                   atol=(1e-6 if fp32 else 1e-12) * scale, msg=name)


def test_chunked_mixer_keeps_only_the_input_and_small_carries_for_backward():
    # What autograd holds between forward and backward: x, and per piece the carried state and conv
    # tail; nothing of the length of the sequence times the mixer's width (the unchunked layer holds
    # several such tensors).
    norm, mixer = make_mixer("srmamba")
    norm, mixer = norm.float(), mixer.float()
    x = torch.randn(1, 200, D_MODEL, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = chunked_mixer(norm, mixer, x, 50)
    assert [t.shape for t in saved] == [x.shape]
    unchunked = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: unchunked.append(t) or t, lambda t: t):
        mixer(norm(x))
    d_inner = mixer.branches[0].d_inner
    assert max(t.numel() for t in unchunked) >= 200 * d_inner   # the check can fail
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_chunk_must_be_positive():
    norm, mixer = make_mixer("mamba")
    with pytest.raises(ValueError, match="chunk"):
        chunked_mixer(norm, mixer, torch.randn(1, 4, D_MODEL, dtype=torch.float64), 0)
