"""Fused Triton SMI kernels on a CUDA device: fp32 / fp16 / bf16 against float64 references, streaming at larger N,
the memory model, bit-identical results (calls, processes), CUDA-graph capture, precompile, autotuning and
torch.compile. Skipped without CUDA (tests/test_kernels.py covers the CPU interpreter)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

triton = pytest.importorskip("triton")

from smi_timm import kernels  # noqa: E402
from smi_timm.kernels import precompile, smi_dense_peak_bytes, smi_loss_triton, smi_streaming_peak_bytes  # noqa: E402

from references import (  # noqa: E402
    TOL,
    assert_grad_close,
    check,
    make_pair,
    reference_with_grads,
    tf32_variants,
    triton_with_grads,
)

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pair(n, d, dtype, seed=0, noise=0.7):
    return make_pair(n, d, dtype, DEVICE, seed, noise)


F32, F16, BF16 = DTYPES


# odd and aligned shapes over the heuristic's regimes (64 x 64 tiles with and without split-K, 128 x 128 tiles),
# each dtype at least twice; few distinct kernel variants, so that the module compiles in seconds
@pytest.mark.parametrize("n,d,dtype", [(2, 2, F32), (3, 7, F16), (129, 130, BF16), (129, 130, F32), (257, 512, F16),
                                       (257, 512, BF16), (1000, 96, BF16), (1000, 96, F32), (256, 8192, F16)])
def test_matches_reference(n, d, dtype):
    za, zb = pair(n, d, dtype, seed=n + d)
    check(za, zb, dtype, neg_weight=1.3)


@pytest.mark.parametrize("n,d,dtype", [(17, 64, F32), (256, 8192, BF16)])
def test_square_transform(n, d, dtype):
    za, zb = pair(n, d, dtype, seed=n + d)
    check(za, zb, dtype, transform="square", neg_weight=1.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("streaming", [False, True])
def test_gradient_products(dtype, streaming):
    za, zb = pair(300, 256, dtype, seed=3, noise=3.0)
    check(za, zb, dtype, neg_weight=20.0, streaming=streaming, block_rows=64 if streaming else None)


@pytest.mark.parametrize("case", ["same", "negated", "identical_rows"])
def test_near_degenerate(case):
    g = torch.Generator(device=DEVICE).manual_seed(11)
    za = torch.randn(64, 96, generator=g, device=DEVICE)
    if case == "same":
        zb = za.clone()
    elif case == "negated":
        zb = -za
    else:
        za = za[:1].repeat(64, 1) + 0.05 * torch.randn(64, 96, generator=g, device=DEVICE)
        zb = za[:1].repeat(64, 1) + 0.05 * torch.randn(64, 96, generator=g, device=DEVICE)
    l_ref, ga_ref, gb_ref = reference_with_grads(za, zb)
    loss, ga, gb = triton_with_grads(za, zb)
    torch.testing.assert_close(loss.double(), l_ref, **TOL[torch.float32])
    # rho_ii ~ 1 - 1e-6 makes the fp32 gradient ill-conditioned (phi'' ~ 2/eps^2); see tests/test_kernels.py
    torch.testing.assert_close(ga.double(), ga_ref, **TOL[torch.float32])
    torch.testing.assert_close(gb.double(), gb_ref, **TOL[torch.float32])


def test_non_contiguous():
    base_a, base_b = pair(300, 400, torch.bfloat16, seed=21)
    check(base_a[:, ::2], base_b.t().contiguous().t()[:, 1::2], torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streaming_large_n(dtype):
    n, d = 12000 if dtype == torch.bfloat16 else 8300, 128  # both above the 256 MiB auto-streaming threshold
    za, zb = pair(n, d, dtype, seed=5, noise=1.0)
    stream = triton_with_grads(za, zb)  # auto: streams
    dense = triton_with_grads(za, zb, streaming=False)
    # the same tiles; the streamed H.T @ ahat adds its row blocks in another order: compare relatively
    torch.testing.assert_close(stream[0], dense[0], atol=1e-6, rtol=1e-5)
    for s, t in zip(stream[1:], dense[1:]):
        rel = (s.double() - t.double()).norm() / t.double().norm()
        assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel
    losses = pytest.importorskip("smi_timm.losses")
    a, b = za.float().requires_grad_(), zb.float().requires_grad_()
    ref = losses.smi_loss_reference(a, b, chunk_size=2048)
    ref.backward()
    torch.testing.assert_close(stream[0], ref.detach(), **TOL[dtype])
    assert_grad_close(stream[1].double(), a.grad.double(), dtype)
    assert_grad_close(stream[2].double(), b.grad.double(), dtype)


def _measured_peak(za, zb, **kw):
    """Peak bytes one forward + backward allocates above a clean baseline (no old gradients, compiled kernels)."""
    za.requires_grad_()
    zb.requires_grad_()
    smi_loss_triton(za, zb, **kw).backward()  # compiles
    za.grad = zb.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    smi_loss_triton(za, zb, **kw).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    za.grad = zb.grad = None
    return peak


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("streaming", [True, False])
def test_peak_memory_matches_the_model(dtype, streaming):
    n, d, rows = 8192, 1024, 1024
    za, zb = pair(n, d, dtype, seed=1)
    if streaming:
        peak = _measured_peak(za, zb, streaming=True, block_rows=rows)
        model = smi_streaming_peak_bytes(n, d, rows, dtype)
    else:
        peak = _measured_peak(za, zb, streaming=False)
        model = smi_dense_peak_bytes(n, d, dtype)
    # exact up to the allocator: each buffer over 1 MiB may come with < 1 MiB of unsplit segment (8 buffers)
    assert model <= peak <= model + 8 * 2 ** 20, (peak, model)
    assert abs(peak - model) <= 0.05 * model


def test_default_block_rows_used():
    from smi_timm.kernels._memory import default_block_rows

    assert default_block_rows(16384, torch.bfloat16) == 2048


@pytest.mark.parametrize("kw", [{}, dict(streaming=True, block_rows=96)])
def test_bit_identical_across_calls(kw):
    za, zb = pair(300, 512, torch.bfloat16, seed=8)
    first = triton_with_grads(za, zb, **kw)
    for _ in range(3):
        again = triton_with_grads(za, zb, **kw)
        for x, y in zip(first, again):
            assert torch.equal(x, y)


_DIGEST = textwrap.dedent('''
    import hashlib, sys
    sys.path.insert(0, {tests!r})
    import torch
    from references import make_pair
    from smi_timm.kernels import smi_loss_triton
    h = hashlib.sha256()
    for n, d, dtype in ((256, 2048, torch.bfloat16), (300, 130, torch.float32)):
        za, zb = make_pair(n, d, dtype, "cuda", 4, 0.7)
        za.requires_grad_()
        zb.requires_grad_()
        loss = smi_loss_triton(za, zb)
        loss.backward()
        for t in (loss, za.grad, zb.grad):
            h.update(t.detach().float().cpu().numpy().tobytes())
    print(h.hexdigest())
''')


def test_bit_identical_across_processes(tmp_path):
    script = tmp_path / "digest.py"
    script.write_text(_DIGEST.format(tests=os.path.dirname(os.path.abspath(__file__))))
    digests = []
    for _ in range(2):
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        digests.append(out.stdout.split()[-1])
    assert len(digests[0]) == 64 and digests[0] == digests[1]


def test_cuda_graph_capture():
    za, zb = pair(256, 2048, torch.bfloat16, seed=6)
    a, b = za.clone().requires_grad_(), zb.clone().requires_grad_()
    eager = triton_with_grads(za, zb)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            a.grad = b.grad = None
            smi_loss_triton(a, b).backward()
    torch.cuda.current_stream().wait_stream(stream)
    a.grad = b.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = smi_loss_triton(a, b)
        loss.backward()
    a.grad.zero_()
    b.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss, eager[0]) and torch.equal(a.grad, eager[1]) and torch.equal(b.grad, eager[2])


def test_precompile_compiles_everything_a_call_launches():
    n, d = 200, 384  # a shape no other test uses
    seconds = precompile(n, d, torch.bfloat16, DEVICE)
    assert seconds > 0
    caches = {name: len(getattr(kernels.smi.K, name).device_caches[torch.cuda.current_device()][0])
              for name in kernels.smi.K.LAUNCHED}
    za, zb = pair(n, d, torch.bfloat16, seed=2)
    triton_with_grads(za, zb)
    after = {name: len(getattr(kernels.smi.K, name).device_caches[torch.cuda.current_device()][0])
             for name in kernels.smi.K.LAUNCHED}
    assert after == caches  # nothing new was compiled by the call
    assert precompile(n, d, torch.bfloat16, DEVICE) < seconds  # warm: a cache lookup


def test_tf32_is_opt_in():
    za, zb = pair(300, 512, torch.float32, seed=7)
    exact, same, tf32 = tf32_variants(za, zb, looser="high")
    for x, y in zip(exact, same):
        assert torch.equal(x, y)
    check(za, zb, torch.float32)
    torch.testing.assert_close(tf32[0], exact[0], atol=2e-3, rtol=1e-2)


def test_autotune_option(monkeypatch):
    # two candidates per kernel keep the test short; the tuning logic is the same
    full = kernels.smi.autotune_tiles
    monkeypatch.setattr(kernels.smi, "autotune_tiles", lambda base, rho: full(base, rho)[:2])
    monkeypatch.setattr(kernels.smi, "_TUNERS", {})
    za, zb = pair(300, 256, torch.bfloat16, seed=9, noise=2.0)
    check(za, zb, torch.bfloat16, autotune=True, neg_weight=8.0)
    check(za, zb, torch.bfloat16, autotune=True, neg_weight=8.0, streaming=True, block_rows=64)


def test_compile_no_graph_break():
    za, zb = pair(256, 128, torch.bfloat16, seed=2)

    def fn(a, b):
        return smi_loss_triton(a, b) * 2.0

    explanation = torch._dynamo.explain(fn)(za, zb)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(fn, fullgraph=True)
    a, b = za.clone().requires_grad_(), zb.clone().requires_grad_()
    out = compiled(a, b)
    out.backward()
    eager = triton_with_grads(za, zb)
    torch.testing.assert_close(out.detach(), 2.0 * eager[0])
    torch.testing.assert_close(a.grad, 2.0 * eager[1])
    torch.testing.assert_close(b.grad, 2.0 * eager[2])


def test_opcheck():
    za, zb = pair(64, 96, torch.float32, seed=3)
    opts = (1.0, 1e-3, "mi", False, None, False, False, [])
    for a, row0 in ((za, 0), (za[16:40], 16)):  # the square loss, and a block of local rows
        torch.library.opcheck(torch.ops.smi_timm.smi_loss_fwd.default, (a, zb, row0, *opts, True))
        _, ws_c, ws_f = torch.ops.smi_timm.smi_loss_fwd(a, zb, row0, *opts, True)
        torch.library.opcheck(torch.ops.smi_timm.smi_loss_bwd.default,
                              (torch.tensor(1.0, device=DEVICE), a, zb, ws_c, ws_f, row0, *opts, True, True))


def test_cpu_tensor_rejected_without_interpreter():
    if kernels.INTERPRET:
        pytest.skip("interpreter mode accepts CPU tensors")
    with pytest.raises(RuntimeError, match="CUDA"):
        smi_loss_triton(torch.randn(8, 16), torch.randn(8, 16))


def test_auto_backend_uses_the_kernels_on_cuda():
    from smi_timm.losses.smi import resolve_backend

    assert resolve_backend("auto", DEVICE) == ("torch" if kernels.INTERPRET else "triton")
