"""selective_scan: native vs reference (outputs and gradients), mamba-ssm's oracle and kernel when present."""

import pytest
import torch

from wsi_pipeline.ssm import scan
from wsi_pipeline.ssm.scan import selective_scan, selective_scan_native, selective_scan_ref

# mamba-ssm's own test tolerance for fp32 selective_scan.
RTOL, ATOL = 6e-4, 2e-3


def make_inputs(batch, dim, seqlen, dstate, variable_B, variable_C, has_D, has_z, has_delta_bias,
                dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device).requires_grad_()

    A = (-0.5 * torch.rand(dim, dstate, generator=gen)).to(dtype=dtype, device=device).requires_grad_()
    return dict(
        u=rand(batch, dim, seqlen),
        delta=(0.5 * torch.rand(batch, dim, seqlen, generator=gen)).to(dtype=dtype, device=device).requires_grad_(),
        A=A,
        B=rand(batch, dstate, seqlen) if variable_B else rand(dim, dstate),
        C=rand(batch, dstate, seqlen) if variable_C else rand(dim, dstate),
        D=rand(dim) if has_D else None,
        z=rand(batch, dim, seqlen) if has_z else None,
        delta_bias=(0.5 * torch.rand(dim, generator=gen)).to(dtype=dtype, device=device).requires_grad_()
        if has_delta_bias
        else None,
    )


def run_with_grads(fn, inputs, delta_softplus, seed=1):
    """Output, last state and gradients of a fixed random projection of both."""
    out, last_state = fn(**inputs, delta_softplus=delta_softplus, return_last_state=True)
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=gen).to(out)
    g_last = torch.randn(last_state.shape, generator=gen).to(last_state)
    leaves = [v for v in inputs.values() if v is not None]
    grads = torch.autograd.grad([out, last_state], leaves, [g_out, g_last])
    return out, last_state, dict(zip([k for k, v in inputs.items() if v is not None], grads))


@pytest.fixture(params=[7, scan.MAX_CHUNK_STEPS], ids=["multi_chunk", "one_chunk"])
def max_chunk_steps(request, monkeypatch):
    # Short chunks make small test sequences cross several chunk boundaries.
    monkeypatch.setattr(scan, "MIN_CHUNK_STEPS", min(scan.MIN_CHUNK_STEPS, request.param))
    monkeypatch.setattr(scan, "MAX_CHUNK_STEPS", request.param)
    # Blocks of 2 chunks: the multi-chunk sequences also cross block boundaries, and end on a part block.
    monkeypatch.setattr(scan, "CHUNKS_PER_BLOCK", 2)
    return request.param


@pytest.mark.parametrize("variable_B,variable_C", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("has_D,has_z,has_delta_bias,delta_softplus", [
    (True, True, True, True),
    (False, False, False, False),
    (True, False, True, False),
    (False, True, False, True),
])
def test_native_matches_ref_outputs_and_grads(max_chunk_steps, variable_B, variable_C, has_D, has_z,
                                              has_delta_bias, delta_softplus):
    seed = hash((variable_B, variable_C, has_D, has_z, has_delta_bias, max_chunk_steps)) % 1000
    shape = dict(batch=2, dim=6, seqlen=37 + seed % 13, dstate=4 + seed % 5)
    flags = dict(variable_B=variable_B, variable_C=variable_C, has_D=has_D, has_z=has_z,
                 has_delta_bias=has_delta_bias, seed=seed)
    native = run_with_grads(selective_scan_native, make_inputs(**shape, **flags), delta_softplus)
    ref = run_with_grads(selective_scan_ref, make_inputs(**shape, **flags), delta_softplus)
    torch.testing.assert_close(native[0], ref[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(native[1], ref[1], rtol=RTOL, atol=ATOL)
    assert native[2].keys() == ref[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(native[2][name], ref[2][name], rtol=RTOL, atol=ATOL, msg=f"grad of {name}")


@pytest.mark.parametrize("has_z", [True, False])
def test_native_matches_ref_for_one_sequence(max_chunk_steps, has_z):
    # B = 1 (a MIL bag): the scan writes its results straight into the step-major outputs instead of
    # through block temporaries, a path batch 2 does not take.
    flags = dict(variable_B=True, variable_C=True, has_D=True, has_z=has_z, has_delta_bias=True, seed=11)
    native = run_with_grads(selective_scan_native, make_inputs(1, 6, 45, 4, **flags), True)
    ref = run_with_grads(selective_scan_ref, make_inputs(1, 6, 45, 4, **flags), True)
    for a, b in zip(native[:2], ref[:2]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for name in ref[2]:
        torch.testing.assert_close(native[2][name], ref[2][name], rtol=RTOL, atol=ATOL, msg=f"grad of {name}")


def test_native_gradcheck_fp64(max_chunk_steps):
    inputs = make_inputs(1, 3, 20, 2, True, True, True, True, True, dtype=torch.float64)
    names = list(inputs)

    def fn(*args):
        return selective_scan_native(**dict(zip(names, args)), delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()))


def test_native_is_exact_in_fp64():
    inputs = make_inputs(2, 5, 300, 3, True, False, True, True, True, dtype=torch.float64)
    native = selective_scan_native(**inputs, delta_softplus=True)
    ref = selective_scan_ref(**inputs, delta_softplus=True)
    torch.testing.assert_close(native, ref, rtol=1e-12, atol=1e-12)


def test_low_precision_inputs_keep_dtype_and_accumulate_in_fp32():
    inputs = make_inputs(1, 4, 50, 3, True, True, True, True, True, dtype=torch.bfloat16)
    out, last_state = selective_scan_native(**inputs, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.bfloat16 and last_state.dtype == torch.float32
    torch.testing.assert_close(out, selective_scan_ref(**inputs, delta_softplus=True), rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert inputs["u"].grad.dtype == torch.bfloat16


def test_no_grad_needed_keeps_no_boundary_states():
    inputs = {k: v.detach() if v is not None else None
              for k, v in make_inputs(1, 4, 40, 3, True, True, True, True, True).items()}
    out = selective_scan_native(**inputs)
    assert out.grad_fn is None


def test_complex_A_is_a_clear_error():
    inputs = make_inputs(1, 4, 10, 3, True, True, False, False, False)
    inputs["A"] = torch.complex(inputs["A"].detach(), torch.ones(4, 3))
    for fn in (selective_scan_native, selective_scan_ref):
        with pytest.raises(NotImplementedError, match="complex A"):
            fn(**inputs)


def test_bad_shapes_name_the_argument():
    inputs = make_inputs(1, 4, 10, 3, True, True, True, False, False)
    inputs["B"] = torch.randn(1, 3, 9)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_native(**inputs)


def test_public_entry_point_dispatches_on_backend():
    inputs = make_inputs(1, 4, 30, 3, True, True, True, True, True)
    via_native = selective_scan(**inputs, delta_softplus=True, backend="native")
    via_ref = selective_scan(**inputs, delta_softplus=True, backend="ref")
    torch.testing.assert_close(via_native, via_ref, rtol=RTOL, atol=ATOL)


def _mamba_ref_or_skip():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref as mamba_ref
    except Exception as exc:  # mamba-ssm can fail with non-ImportErrors where CUDA is missing
        pytest.skip(f"mamba-ssm not importable: {exc}")
    return mamba_ref


@pytest.mark.parametrize("variable_B,has_z", [(True, True), (False, False)])
def test_native_matches_mamba_ssm_reference(variable_B, has_z):
    mamba_ref = _mamba_ref_or_skip()
    inputs = make_inputs(2, 6, 64, 4, variable_B, True, True, has_z, True)
    ours = run_with_grads(selective_scan_native, inputs, True)
    theirs = run_with_grads(mamba_ref, inputs, True)
    for a, b in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for name in theirs[2]:
        torch.testing.assert_close(ours[2][name], theirs[2][name], rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variable_B,has_z", [(True, True), (False, False)])
def test_cuda_backend_matches_native_on_gpu(variable_B, has_z):
    from wsi_pipeline.ssm.backend import mamba_kernel_available

    if not mamba_kernel_available():
        pytest.skip("mamba-ssm kernel not installed")
    inputs = make_inputs(2, 64, 500, 16, variable_B, True, True, has_z, True, device="cuda")
    results = {}
    for backend in ("cuda", "native"):
        out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend=backend)
        # Gradients of `out` only: the kernel's last state has none (detached on `cuda`).
        g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        leaves = {k: v for k, v in inputs.items() if v is not None}
        results[backend] = (out, last, dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), g_out))))
    cuda, native = results["cuda"], results["native"]
    assert not cuda[1].requires_grad
    for a, b in zip(cuda[:2], native[:2]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for name in native[2]:
        torch.testing.assert_close(cuda[2][name], native[2][name], rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_native_matches_ref_on_a_long_wide_sequence():
    inputs = make_inputs(1, 64, 3000, 16, True, True, True, True, True)
    native = run_with_grads(selective_scan_native, inputs, True)
    ref = run_with_grads(selective_scan_ref, inputs, True)
    torch.testing.assert_close(native[0], ref[0], rtol=RTOL, atol=ATOL)
    for name in ref[2]:
        torch.testing.assert_close(native[2][name], ref[2][name], rtol=RTOL, atol=ATOL)


def _saved_for_backward(fn, inputs):
    """Tensors autograd keeps from ``fn``'s forward for backward, excluding the inputs themselves."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn(**inputs, delta_softplus=True)
    input_ptrs = {v.data_ptr() for v in inputs.values() if v is not None}
    return out, [t for t in saved if t.data_ptr() not in input_ptrs]


def test_native_saves_only_chunk_boundary_states_for_backward(monkeypatch):
    monkeypatch.setattr(scan, "MAX_CHUNK_STEPS", 16)
    batch, dim, seqlen, dstate = 2, 16, 256, 8
    inputs = make_inputs(batch, dim, seqlen, dstate, True, True, True, True, True)
    out, saved = _saved_for_backward(selective_scan_native, inputs)
    full_states = batch * dim * seqlen * dstate  # one (B, D, L, N) tensor
    assert saved, "saved_tensors_hooks saw nothing: the check would be vacuous"
    assert sum(t.numel() for t in saved) <= full_states // 16  # L/T boundary states of (B, D, N)
    out.sum().backward()
    assert inputs["u"].grad is not None
    # The check can fail: the reference keeps whole-sequence (B, D, L, N) tensors.
    _, saved_ref = _saved_for_backward(selective_scan_ref, make_inputs(batch, dim, seqlen, dstate, True, True,
                                                                       True, True, True))
    assert max(t.numel() for t in saved_ref) >= full_states


def test_native_reads_step_major_views_and_returns_step_major_results():
    # As MambaBlock feeds it: u, z halves of one (B, L, 2D) projection, B and C slices of x_proj's
    # (B, L, R + 2N) output, all viewed as (B, X, L). Results must equal ref's on contiguous copies,
    # and come back step-major, the layout out_proj (and in_proj's backward) read.
    gen = torch.Generator().manual_seed(3)
    batch, dim, seqlen, dstate, rank = 2, 6, 45, 4, 3
    xz = torch.randn(batch, seqlen, 2 * dim, generator=gen)
    x_dbl = torch.randn(batch, seqlen, rank + 2 * dstate, generator=gen)
    views = dict(u=xz[..., :dim].transpose(1, 2), z=xz[..., dim:].transpose(1, 2),
                 delta=(0.5 * torch.rand(batch, seqlen, dim, generator=gen)).transpose(1, 2),
                 B=x_dbl[..., rank:rank + dstate].transpose(1, 2), C=x_dbl[..., rank + dstate:].transpose(1, 2))
    params = dict(A=-0.5 * torch.rand(dim, dstate, generator=gen), D=torch.randn(dim, generator=gen),
                  delta_bias=torch.rand(dim, generator=gen))
    native_in = {k: v.clone().requires_grad_() if k in params else v.detach().requires_grad_()
                 for k, v in {**views, **params}.items()}
    ref_in = {k: v.detach().contiguous().requires_grad_() for k, v in {**views, **params}.items()}
    native = run_with_grads(selective_scan_native, native_in, True)
    ref = run_with_grads(selective_scan_ref, ref_in, True)
    assert native[0].transpose(1, 2).is_contiguous()
    for name in ("u", "z", "delta", "B", "C"):
        assert native[2][name].transpose(1, 2).is_contiguous(), name
    torch.testing.assert_close(native[0], ref[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(native[1], ref[1], rtol=RTOL, atol=ATOL)
    for name in ref[2]:
        torch.testing.assert_close(native[2][name], ref[2][name], rtol=RTOL, atol=ATOL, msg=f"grad of {name}")


def test_initial_state_native_matches_ref_with_its_gradient(max_chunk_steps):
    # The carried state of a sequence scanned in pieces: native and ref agree on outputs and on every
    # gradient, the initial state's included (it flows back through every decay of the sequence).
    inputs = make_inputs(2, 6, 40, 4, True, True, True, True, True, seed=5)
    gen = torch.Generator().manual_seed(6)
    inputs["initial_state"] = torch.randn(2, 6, 4, generator=gen).requires_grad_()
    native = run_with_grads(selective_scan_native, inputs, True)
    ref = run_with_grads(selective_scan_ref, {k: v.detach().requires_grad_() if v is not None else None
                                              for k, v in inputs.items()}, True)
    assert "initial_state" in native[2]
    for a, b in zip(native[:2], ref[:2]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for name in ref[2]:
        torch.testing.assert_close(native[2][name], ref[2][name], rtol=RTOL, atol=ATOL, msg=f"grad of {name}")
    assert native[2]["initial_state"].abs().sum() > 0


def test_scanning_in_pieces_with_the_carried_state_equals_one_scan():
    inputs = make_inputs(1, 5, 50, 3, True, True, True, True, True, dtype=torch.float64)
    whole, last = selective_scan_native(**inputs, delta_softplus=True, return_last_state=True)
    cut, state, outs = 17, None, []
    for lo, hi in ((0, cut), (cut, 50)):
        piece = {k: (v[..., lo:hi] if v is not None and v.dim() == 3 and v.shape[-1] == 50 else v)
                 for k, v in inputs.items()}
        out, state = selective_scan_native(**piece, delta_softplus=True, return_last_state=True,
                                           initial_state=state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=-1), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, last, rtol=1e-12, atol=1e-12)


def test_initial_state_with_a_forced_cuda_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(scan, "resolve_backend", lambda backend, device: "cuda")
    inputs = make_inputs(1, 4, 10, 3, True, True, False, False, False)
    with pytest.raises(RuntimeError, match="initial state"):
        selective_scan(**inputs, backend="cuda", initial_state=torch.zeros(1, 4, 3))
    # auto falls back to the native scan, which takes one
    out = selective_scan(**inputs, initial_state=torch.zeros(1, 4, 3))
    torch.testing.assert_close(out, selective_scan_ref(**inputs), rtol=RTOL, atol=ATOL)
