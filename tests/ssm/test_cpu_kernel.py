"""The fused CPU scan (on by default; WSI_SSM_CPU_KERNEL=0 forces the PyTorch scan): same results as
ref (and the PyTorch scan) in every flag combination, across its chunk boundaries, with a carried
initial state; NaN propagates despite -ffast-math; concurrent builds share nothing; inputs it does not
cover run the PyTorch scan."""

import os
import shutil

import pytest
import torch

from wsi_pipeline.ssm import cpu_kernel
from wsi_pipeline.ssm.scan import selective_scan_native, selective_scan_ref

from .test_scan import ATOL, RTOL, make_inputs, run_with_grads

needs_compiler = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")


@pytest.fixture
def kernel_on(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "1")
    if cpu_kernel.load() is None:
        pytest.fail("a C compiler is present but the kernel did not build")


@needs_compiler
def test_on_by_default_and_off_by_the_env_var(monkeypatch):
    inputs = make_inputs(1, 4, 10, 3, True, True, True, True, True)
    monkeypatch.delenv(cpu_kernel.ENV_VAR, raising=False)
    assert cpu_kernel.applies(**inputs, initial_state=None)
    for off in ("0", "off", "False", " no "):
        monkeypatch.setenv(cpu_kernel.ENV_VAR, off)
        assert not cpu_kernel.applies(**inputs, initial_state=None), off


@needs_compiler
@pytest.mark.parametrize("name", ["u", "delta", "A", "B", "C", "z", "delta_bias"])
def test_a_nan_input_gives_nan_outputs_as_the_pytorch_scan(kernel_on, monkeypatch, name):
    """-ffast-math lets gcc assume no NaN; the kernel's exp and log clamp their arguments, which
    turned a NaN delta into a finite output (a diverged run looked healthy). NaN is tested on bits."""
    inputs = {k: v.detach().clone() if v is not None else None
              for k, v in make_inputs(1, 8, 40, 4, True, True, True, True, True, seed=3).items()}
    inputs[name].view(-1)[5] = float("nan")
    kernel = selective_scan_native(**inputs, delta_softplus=True)
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "0")
    torch_scan = selective_scan_native(**inputs, delta_softplus=True)
    assert torch.isnan(torch_scan).any()
    assert torch.equal(torch.isnan(kernel), torch.isnan(torch_scan))


@needs_compiler
def test_concurrent_first_builds_share_no_file(monkeypatch, tmp_path):
    """Parallel jobs start at once: each build is private (its own 0700 temp dir, removed after
    loading), so none reads another's half-written library and nothing is left behind."""
    import concurrent.futures
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        path = real_mkdtemp(*args, **kwargs)
        seen.append((path, os.stat(path).st_mode & 0o777))
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:      # ctypes and cc release the GIL
        libs = list(pool.map(lambda _: cpu_kernel._build_and_load(), range(3)))
    assert all(lib is not None for lib in libs)
    assert len({path for path, _ in seen}) == 3 and all(mode == 0o700 for _, mode in seen)
    assert list(tmp_path.iterdir()) == []
    inputs = make_inputs(1, 4, 20, 3, True, True, True, True, True)
    outs = []
    for lib in libs:
        monkeypatch.setattr(cpu_kernel, "load", lambda lib=lib: lib)
        outs.append(selective_scan_native(**inputs, delta_softplus=True).detach())
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_compiler
@pytest.mark.parametrize("has_D,has_z,has_delta_bias,delta_softplus", [
    (True, True, True, True), (False, False, False, False), (True, False, True, False), (False, True, False, True),
])
@pytest.mark.parametrize("batch,seqlen", [(1, 45), (2, 100)])   # 100 steps cross 3 kernel chunks of 32
def test_kernel_matches_ref_outputs_and_grads(kernel_on, batch, seqlen, has_D, has_z, has_delta_bias,
                                              delta_softplus):
    flags = dict(variable_B=True, variable_C=True, has_D=has_D, has_z=has_z, has_delta_bias=has_delta_bias,
                 seed=seqlen + batch)
    inputs = make_inputs(batch, 6, seqlen, 5, **flags)
    assert cpu_kernel.applies(**inputs, initial_state=None)
    gen = torch.Generator().manual_seed(2)
    inputs["initial_state"] = torch.randn(batch, 6, 5, generator=gen).requires_grad_()
    kernel = run_with_grads(selective_scan_native, inputs, delta_softplus)
    ref = run_with_grads(selective_scan_ref, {k: v.detach().requires_grad_() if v is not None else None
                                              for k, v in inputs.items()}, delta_softplus)
    assert kernel[0].transpose(1, 2).is_contiguous()        # step-major, as the PyTorch scan returns it
    for a, b in zip(kernel[:2], ref[:2]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert kernel[2].keys() == ref[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(kernel[2][name], ref[2][name], rtol=RTOL, atol=ATOL, msg=f"grad of {name}")


@needs_compiler
def test_kernel_matches_the_pytorch_scan_closely(kernel_on, monkeypatch):
    inputs = make_inputs(1, 64, 300, 16, True, True, True, True, True, seed=4)
    kernel = run_with_grads(selective_scan_native, inputs, True)
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "0")
    torch_scan = run_with_grads(selective_scan_native, {k: v.detach().requires_grad_() if v is not None else None
                                                        for k, v in inputs.items()}, True)
    torch.testing.assert_close(kernel[0], torch_scan[0], rtol=1e-5, atol=1e-5)
    for name in torch_scan[2]:
        scale = torch_scan[2][name].abs().max().item()
        torch.testing.assert_close(kernel[2][name], torch_scan[2][name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@needs_compiler
def test_uncovered_inputs_run_the_pytorch_scan(kernel_on):
    fixed_B = make_inputs(1, 4, 20, 3, False, True, True, True, True)
    fp64 = make_inputs(1, 4, 20, 3, True, True, True, True, True, dtype=torch.float64)
    for inputs in (fixed_B, fp64):
        assert not cpu_kernel.applies(**inputs, initial_state=None)
        torch.testing.assert_close(selective_scan_native(**inputs, delta_softplus=True),
                                   selective_scan_ref(**inputs, delta_softplus=True), rtol=RTOL, atol=ATOL)


def test_missing_compiler_warns_and_falls_back(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    cpu_kernel.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="did not compile|no C compiler"):
            assert cpu_kernel.load() is None
        inputs = make_inputs(1, 4, 20, 3, True, True, True, True, True)
        assert not cpu_kernel.applies(**inputs, initial_state=None)
    finally:
        cpu_kernel.load.cache_clear()


@needs_compiler
def test_kernel_leaves_the_callers_state_and_gradient_tensors_alone(kernel_on):
    # A carried state handed back in is a (B, D, N) view of (B, N, D) memory, the layout the kernel
    # writes its last state into: it must work on a copy (the chunked layer keeps these for backward).
    inputs = make_inputs(1, 6, 40, 4, True, True, True, True, True, seed=9)
    state = torch.randn(1, 4, 6).transpose(1, 2).requires_grad_()
    before = state.detach().clone()
    out, last = selective_scan_native(**inputs, delta_softplus=True, return_last_state=True, initial_state=state)
    grad_last = torch.randn(1, 4, 6).transpose(1, 2)
    grad_before = grad_last.clone()
    torch.autograd.backward([out, last], [torch.ones_like(out), grad_last])
    assert torch.equal(state.detach(), before) and torch.equal(grad_last, grad_before)
    assert state.grad is not None


@needs_compiler
def test_chunked_layer_with_the_kernel_matches_the_whole_layer(kernel_on):
    from wsi_pipeline.ssm.chunked import chunked_mixer

    from .test_chunked import D_MODEL, make_mixer, outputs_and_grads

    norm, mixer = (m.float() for m in make_mixer("srmamba"))
    gen = torch.Generator().manual_seed(1)
    x, grad = torch.randn(2, 2, 50, D_MODEL, generator=gen)
    whole = outputs_and_grads(lambda t: mixer(norm(t)), norm, mixer, x, grad)
    pieces = outputs_and_grads(lambda t: chunked_mixer(norm, mixer, t, 7), norm, mixer, x, grad)
    torch.testing.assert_close(pieces[0], whole[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(pieces[1], whole[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@needs_compiler
def test_loading_the_kernel_keeps_the_process_float_mode(kernel_on):
    """-ffast-math at link time would pull in crtfastmath.o, whose constructor turns on flush-to-zero
    for the whole process: every later float computation (torch's too) would lose denormals."""
    assert cpu_kernel.load() is not None
    tiny = torch.tensor([1e-39], dtype=torch.float32) / 10
    assert tiny.item() > 0
