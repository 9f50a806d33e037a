"""The `cuda` dispatch against the kernels' real call signatures, without a GPU: stand-ins with
mamba-ssm's `selective_scan_fn` and causal-conv1d's (>= 1.1) `causal_conv1d_fn` signatures are
swapped in for the imports, so a wrong argument order fails here rather than on a user's GPU."""

from __future__ import annotations

import torch

import wsi_pipeline.ssm.conv1d as conv1d_module
import wsi_pipeline.ssm.scan as scan_module
from wsi_pipeline.ssm import MambaBlock, selective_scan_native, selective_scan_ref


def fake_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    fake_selective_scan_fn.calls += 1
    out = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if not return_last_state:
        return out
    # As the compiled kernel (measured on an H100): with a time-invariant B the state it returns lacks
    # B's factor, and the state is outside autograd's graph.
    B_state = torch.ones_like(B) if B.dim() == 2 else B
    _, last = selective_scan_ref(u, delta, A, B_state, C, D, z, delta_bias, delta_softplus, True)
    return out[0], last.detach()


def fake_causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                          final_states_out=None, activation=None):
    assert seq_idx is None and initial_states is None and not return_final_states
    assert activation in (None, "silu", "swish")
    if not 2 <= weight.shape[1] <= 4:  # as the compiled kernel does
        raise RuntimeError("causal_conv1d only supports width between 2 and 4")
    fake_causal_conv1d_fn.calls += 1
    out = torch.nn.functional.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[1] - 1,
                                     groups=x.shape[1])[..., : x.shape[-1]]
    return torch.nn.functional.silu(out) if activation else out


def _pretend_cuda(monkeypatch):
    fake_selective_scan_fn.calls = fake_causal_conv1d_fn.calls = 0
    monkeypatch.setattr(scan_module, "resolve_backend", lambda backend, device: "cuda")
    monkeypatch.setattr(scan_module, "load_mamba_selective_scan_fn", lambda: fake_selective_scan_fn)
    monkeypatch.setattr(conv1d_module, "resolve_backend", lambda backend, device: "cuda")
    monkeypatch.setattr(conv1d_module, "causal_conv1d_kernel_available", lambda: True)
    monkeypatch.setattr(conv1d_module, "load_causal_conv1d_fn", lambda: fake_causal_conv1d_fn)


def test_selective_scan_passes_every_option_to_the_kernel_by_name(monkeypatch):
    _pretend_cuda(monkeypatch)
    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 8, 4, 33
    u, delta, z = (torch.randn(b, d, length, generator=g) for _ in range(3))
    A = -torch.rand(d, n, generator=g) - 0.5
    B, C = torch.randn(b, n, length, generator=g), torch.randn(b, n, length, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    out, last = scan_module.selective_scan(u, delta, A, B, C, D, z, bias, True, True)
    assert fake_selective_scan_fn.calls == 1
    assert not last.requires_grad  # the kernel has no last-state gradient: detached, not silently zero
    want_out, want_last = selective_scan_native(u, delta, A, B, C, D, z, bias, True, True)
    torch.testing.assert_close(out, want_out, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, want_last, rtol=6e-4, atol=2e-3)


def test_mamba_block_on_the_kernel_path_matches_the_cpu_path(monkeypatch):
    torch.manual_seed(0)
    block = MambaBlock(16, d_state=4)
    x = torch.randn(2, 21, 16)
    cpu = block(x)
    _pretend_cuda(monkeypatch)
    kernel = block(x)
    assert fake_selective_scan_fn.calls >= 1 and fake_causal_conv1d_fn.calls >= 1
    torch.testing.assert_close(kernel, cpu, rtol=6e-4, atol=2e-3)


def test_conv_widths_the_kernel_lacks_fall_back_to_torch(monkeypatch):
    _pretend_cuda(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 30, generator=g)
    for width in (1, 2, 4, 5, 7):
        weight, bias = torch.randn(8, width, generator=g), torch.randn(8, generator=g)
        calls = fake_causal_conv1d_fn.calls
        out = conv1d_module.causal_conv1d(x, weight, bias, "silu")
        assert fake_causal_conv1d_fn.calls == calls + (1 if 2 <= width <= 4 else 0), width
        want = torch.nn.functional.silu(torch.nn.functional.conv1d(
            torch.nn.functional.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=8))
        torch.testing.assert_close(out, want)


def test_time_invariant_B_last_state_gets_B_factor_back(monkeypatch):
    _pretend_cuda(monkeypatch)
    g = torch.Generator().manual_seed(1)
    b, d, n, length = 2, 6, 4, 25
    u, delta = torch.randn(b, d, length, generator=g), torch.rand(b, d, length, generator=g)
    A = -torch.rand(d, n, generator=g) - 0.5
    B, C = torch.randn(d, n, generator=g), torch.randn(b, n, length, generator=g)
    out, last = scan_module.selective_scan(u, delta, A, B, C, return_last_state=True)
    want_out, want_last = selective_scan_ref(u, delta, A, B, C, return_last_state=True)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, want_last, rtol=1e-5, atol=1e-5)


def test_deterministic_training_on_the_kernel_warns_that_it_is_not_bitwise(monkeypatch):
    import warnings
    _pretend_cuda(monkeypatch)
    scan_module._warn_kernel_backward_not_bitwise.cache_clear()
    block = MambaBlock(8, d_state=4)
    x = torch.randn(1, 9, 8)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                block(x)  # inference: nothing to warn about
            torch.use_deterministic_algorithms(False)
            block(x)
            assert not caught
            torch.use_deterministic_algorithms(True)
            block(x).sum().backward()
            block(x)  # warned once per process
    finally:
        torch.use_deterministic_algorithms(previous)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "WSI_SSM_BACKEND=native" in messages[0]
