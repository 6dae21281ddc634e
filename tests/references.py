"""Shared by the kernel test modules: an independent float64 reference of the SMI formula (autograd for the
gradients), the tolerances, and the helpers that compare the fused kernels with it."""
import math

import torch

from smi_timm.losses.smi import DEFAULT_EPS, DEFAULT_NEG_WEIGHT  # the library's default values only, no code

# Liger-Kernel's fp32 / fp16 tolerances. bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 on every
# standardised entry, accumulated over D terms of rho and N terms of the gradient products): atol 2e-2 / rtol 5e-2.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=5e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-2),
    torch.bfloat16: dict(atol=2e-2, rtol=5e-2),
}
# Relative L2 error of the whole gradient (much tighter than the elementwise check for small gradients).
REL_L2 = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def reference_loss(za, zb, neg_weight=DEFAULT_NEG_WEIGHT, eps=DEFAULT_EPS, transform="mi"):
    a, b = za.double(), zb.double()

    def std(x):
        return (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-6)

    n, d = a.shape
    rho = std(a) @ std(b).t() / d
    if transform == "mi":
        phi = 0.5 * math.log(1 + eps) - 0.5 * torch.log(1 + eps - torch.clamp(rho * rho, max=1.0))
    else:
        phi = 0.5 * rho * rho
    eye = torch.eye(n, dtype=torch.bool, device=rho.device)
    return -phi[eye].sum() / n + neg_weight * phi[~eye].sum() / (n * (n - 1))


def reference_with_grads(za, zb, scale=1.0, **kw):
    a = za.detach().double().requires_grad_()
    b = zb.detach().double().requires_grad_()
    loss = reference_loss(a, b, **kw)
    (loss * scale).backward()
    return loss.detach(), a.grad, b.grad


def triton_with_grads(za, zb, scale=1.0, **kw):
    """Loss and gradients of ``smi_loss_triton`` (inputs used as given: non-contiguous stays non-contiguous)."""
    from smi_timm.kernels import smi_loss_triton

    a = za.detach().clone().requires_grad_() if za.is_contiguous() else za.detach().requires_grad_()
    b = zb.detach().clone().requires_grad_() if zb.is_contiguous() else zb.detach().requires_grad_()
    loss = smi_loss_triton(a, b, **kw)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    (loss * scale).backward()
    assert a.grad.dtype == za.dtype and b.grad.shape == zb.shape
    return loss.detach(), a.grad, b.grad


def assert_grad_close(got, ref, dtype, rel_l2=None):
    torch.testing.assert_close(got.double(), ref.double(), **TOL[dtype])
    rel = (got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    limit = REL_L2[dtype] if rel_l2 is None else rel_l2
    assert rel < limit, f"relative L2 gradient error {rel:.3e}"


def check(za, zb, dtype=torch.float32, scale=1.0, ref_inputs=None, rel_l2=None, **kw):
    """Compare the kernels with the float64 reference (computed from the same, possibly low-precision, inputs)."""
    ra, rb = ref_inputs if ref_inputs is not None else (za, zb)
    ref_kw = {k: v for k, v in kw.items() if k in ("neg_weight", "eps", "transform")}
    l_ref, ga_ref, gb_ref = reference_with_grads(ra, rb, scale=scale, **ref_kw)
    loss, ga, gb = triton_with_grads(za, zb, scale=scale, **kw)
    torch.testing.assert_close(loss.double(), l_ref, **TOL[dtype])
    assert_grad_close(ga, ga_ref, dtype, rel_l2)
    assert_grad_close(gb, gb_ref, dtype, rel_l2)
    return loss, ga, gb


def make_pair(n, d, dtype=torch.float32, device="cpu", seed=0, noise=1.0):
    """Two correlated (n, d) views. For d = 2 the rows are scaled to a variance near the 1e-6 floor: at unit
    variance a 2-feature row standardises to +-(1 - 5e-7) whatever its values, its gradient is O(1e-6) and results
    from cancellation, so fp32 (kernels and torch alike) cannot resolve it; near the floor it is well conditioned."""
    g = torch.Generator(device=device).manual_seed(seed)
    za = torch.randn(n, d, generator=g, device=device, dtype=torch.float64) * 1.5 + 0.3
    if d == 2:
        za = za * 1e-3
        noise = noise * 1e-3
    zb = za + noise * torch.randn(n, d, generator=g, device=device, dtype=torch.float64)
    return za.to(dtype), zb.to(dtype)


def tf32_variants(za, zb, looser="high"):
    """``triton_with_grads`` three ways: at torch's "highest" fp32 matmul precision, at a ``looser`` one (which must
    change nothing: fp32 is exact by default) and with ``allow_tf32=True`` (the explicit opt-in)."""
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        exact = triton_with_grads(za, zb)
        torch.set_float32_matmul_precision(looser)
        same = triton_with_grads(za, zb)
        tf32 = triton_with_grads(za, zb, allow_tf32=True)
    finally:
        torch.set_float32_matmul_precision(old)
    return exact, same, tf32
