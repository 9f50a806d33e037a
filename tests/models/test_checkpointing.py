"""checkpoint_above: the Mamba MIL models recompute their layers in backward on long bags, with the
same outputs and gradients as without, and keep fewer activations between forward and backward."""

from __future__ import annotations

import pytest
import torch

from .small_models import grid_coords, make_small

MODELS = ("mambamil", "bimamba_mil", "mamba_mil", "gmmamba", "fmamil")
N_INSTANCES = 60


@pytest.fixture(scope="module")
def bag():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, N_INSTANCES, 12, generator=gen), grid_coords(N_INSTANCES, 10, gen)[None]


def forward_backward(model, bag):
    """Logits and parameter gradients of one training pass, with a fixed seed for dropout and
    context_drop so two models draw the same masks."""
    model.train()
    torch.manual_seed(7)
    out = model(*bag)
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([1])).backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_elements(model, bag):
    """Elements of the tensors autograd keeps for backward during one forward pass."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    model.train()
    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*bag)
    return total


def pair(name, checkpoint_above, **recompute_cfg):
    # context_drop draws a random mask outside the recomputed part: the seeded passes must agree on it.
    cfg = {} if name == "gmmamba" else {"context_drop": 0.25}
    torch.manual_seed(0)
    plain = make_small(name, 12, 2, **cfg)
    torch.manual_seed(0)
    recomputing = make_small(name, 12, 2, checkpoint_above=checkpoint_above, **recompute_cfg, **cfg)
    recomputing.load_state_dict(plain.state_dict())
    return plain, recomputing


def assert_same_outputs_and_gradients(plain, recomputing, bag, logits_tol, grads_tol):
    """Logits and every parameter's gradient of one training pass, each within (rtol, atol)."""
    logits, grads = forward_backward(plain, bag)
    logits_other, grads_other = forward_backward(recomputing, bag)
    torch.testing.assert_close(logits_other, logits, rtol=logits_tol[0], atol=logits_tol[1])
    assert grads_other.keys() == grads.keys() and len(grads) > 10
    for key in grads:
        torch.testing.assert_close(grads_other[key], grads[key], rtol=grads_tol[0], atol=grads_tol[1], msg=key)


@pytest.mark.parametrize("name", MODELS)
def test_checkpointed_model_has_the_same_outputs_and_gradients(name, bag):
    assert_same_outputs_and_gradients(*pair(name, 0), bag, logits_tol=(1e-6, 1e-7), grads_tol=(1e-5, 1e-7))


@pytest.mark.parametrize("name", MODELS)
def test_sequence_chunked_recompute_has_the_same_outputs_and_gradients(name, bag):
    # checkpoint_chunk 7: every layer (GMMamba: every group's layer) is recomputed in pieces of 7 steps,
    # the scan state and conv inputs carried across; fp32, so equal up to summation order.
    # Gradients here are O(0.1-1); they agree to ~1e-7 (measured). attention.score.2.bias has an
    # exactly-zero true gradient (softmax ignores a shift), so only an absolute bound fits it.
    assert_same_outputs_and_gradients(*pair(name, 0, checkpoint_chunk=7), bag, logits_tol=(1e-5, 1e-6),
                                      grads_tol=(1e-4, 1e-6))


def test_checkpoint_chunk_must_be_positive():
    with pytest.raises(ValueError, match="checkpoint_chunk"):
        make_small("mambamil", 12, 2, checkpoint_above=0, checkpoint_chunk=0)


@pytest.mark.parametrize("name", ("mambamil", "gmmamba"))
def test_checkpointing_keeps_fewer_activations_and_only_above_the_threshold(name, bag):
    plain, recomputing = pair(name, 0)
    _, at_threshold = pair(name, N_INSTANCES)   # L = 60 is not above 60: nothing is recomputed
    kept_plain = saved_elements(plain, bag)
    assert saved_elements(recomputing, bag) < 0.6 * kept_plain
    assert saved_elements(at_threshold, bag) == kept_plain


def test_checkpoint_above_must_not_be_negative():
    with pytest.raises(ValueError, match="checkpoint_above"):
        make_small("mambamil", 12, 2, checkpoint_above=-1)
