"""Fused Triton implementation of the SMI loss, wrapped as a ``torch.library`` custom op.

Public entry point: :func:`smi_loss_triton`. See ``docs/kernels.md`` for the design.
"""
import math
import os
from typing import Optional, Tuple

import torch
import triton

from . import _smi_kernels as K
from ._memory import compute_dtype, default_block_rows, should_stream

TRANSFORMS = ("mi", "square")
_TRANSFORM_ID = {"mi": K.TRANSFORM_MI, "square": K.TRANSFORM_SQUARE}

# Backend of the two gradient products H @ bhat and H.T @ ahat (internal flag, documented in docs/kernels.md):
#   "torch"  - torch.mm / torch.addmm (cuBLAS on CUDA, fp32 output via out_dtype for fp16/bf16 operands)
#   "triton" - the autotuned Triton GEMM of this package (fp32 output, in-place accumulation when streaming)
# Override with the environment variable SMI_TRITON_GRAD_GEMM; tests switch it through this module attribute.
GRAD_GEMM = os.environ.get("SMI_TRITON_GRAD_GEMM", "torch")

# Largest fp16 value we let H reach (2**14 leaves headroom below the fp16 maximum 65504).
_FP16_H_MAX = 2.0 ** 14


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
def _dot_precision(cdt):
    if cdt != torch.float32:
        return "ieee"  # ignored for fp16 / bf16 operands
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _h_scale(cdt, eps, transform):
    """Power-of-two factor c with H = c * phi'(rho) representable in the compute dtype.

    |phi'| <= 1/eps for "mi" (|rho| <= 1) and <= ~1 for "square"; only fp16 can overflow.
    """
    if cdt != torch.float16:
        return 1.0
    bound = (1.0 / eps) if transform == "mi" else 2.0
    if bound <= _FP16_H_MAX:
        return 1.0
    return 2.0 ** math.floor(math.log2(_FP16_H_MAX / bound))


def _row_blocks(n, d):
    """(ROWS, BLOCK_D, num_warps) of the row kernels: about 4K elements per chunk on GPU, 256K under the interpreter
    (which pays per program)."""
    budget = 1 << 18 if K.INTERPRET else 1 << 12
    block_d = max(16, min(triton.next_power_of_2(d), budget // 2))
    rows = max(2, min(triton.next_power_of_2(n), budget // block_d))
    return rows, block_d, (8 if rows * block_d >= 4096 else 4)


def _launch_rho_tiles(ahat, bhat, h, part, rows, row_offset, eps, h_scale, transform_id, write_h, compute_loss):
    n, d = bhat.shape
    args = (ahat, bhat, h, part, rows, n, d, row_offset, eps, math.log1p(eps), 1.0 / d, h_scale)
    meta = dict(TRANSFORM=transform_id, WRITE_H=write_h, COMPUTE_LOSS=compute_loss,
                DOT_PREC=_dot_precision(ahat.dtype))
    if K.INTERPRET:
        cfg = K.INTERPRET_TILE
        grid = (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        K._rho_tile_kernel_impl[grid](*args, **meta, **cfg)
    else:
        def grid(m):
            return (triton.cdiv(rows, m["BLOCK_M"]) * triton.cdiv(n, m["BLOCK_N"]),)

        K._rho_tile_kernel_tuned[grid](*args, **meta)


def _triton_mm(a, b, out, accumulate):
    m, k = a.shape
    p = b.shape[1]
    args = (a, b, out, m, p, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1))
    meta = dict(ACCUMULATE=accumulate, DOT_PREC=_dot_precision(a.dtype))
    if K.INTERPRET:
        cfg = K.INTERPRET_GEMM
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(p, cfg["BLOCK_N"]),)
        K._gemm_kernel_impl[grid](*args, **meta, **cfg)
    else:
        def grid(mt):
            return (triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(p, mt["BLOCK_N"]),)

        K._gemm_kernel_tuned[grid](*args, **meta)
    return out


_OUT_DTYPE_OK = True


def _torch_mm(a, b, out, accumulate):
    """out (+)= a @ b with an fp32 ``out``; a, b in the compute dtype."""
    global _OUT_DTYPE_OK
    if a.dtype == torch.float32:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    if a.is_cuda and _OUT_DTYPE_OK:
        try:
            if accumulate:
                return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (RuntimeError, TypeError):  # out_dtype unsupported by this build / GPU
            _OUT_DTYPE_OK = False
    if not a.is_cuda:  # CPU (interpreter runs): exact fp32 product of the low-precision operands
        a, b = a.float(), b.float()
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    prod = torch.mm(a, b)
    return out.add_(prod) if accumulate else out.copy_(prod)


def _grad_mm(a, b, out, accumulate=False):
    if GRAD_GEMM == "triton":
        return _triton_mm(a, b, out, accumulate)
    if GRAD_GEMM == "torch":
        return _torch_mm(a, b, out, accumulate)
    raise ValueError(f"SMI_TRITON_GRAD_GEMM must be 'torch' or 'triton', got {GRAD_GEMM!r}")


def _launch_std_bwd(z, zo, stats, diag, goff, grad, dz, rows, row_offset, side, coef_off, coef_diag):
    n, d = z.shape
    nr, bd, nw = _row_blocks(rows, d)
    has_off = goff is not None
    if goff is None:
        goff = stats  # never read
    K._std_bwd_kernel[(triton.cdiv(rows, nr),)](
        z, z.stride(0), z.stride(1), zo, zo.stride(0), zo.stride(1), stats, diag, goff, goff.stride(0), grad, dz,
        n, rows, d, row_offset, side, coef_off, coef_diag, 1.0 / d,
        HAS_OFF=has_off, ROWS=nr, BLOCK_D=bd, num_warps=nw,
    )


def _check_device(t):
    if t.is_cuda:
        return
    if t.device.type == "cpu" and K.INTERPRET:
        return
    raise RuntimeError(
        f"smi_loss_triton runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, set before Triton is "
        f"imported); got a tensor on {t.device}. Use the torch backend of the SMI loss instead."
    )


# ------------------------------------------------------------------------------------------------------------------
# the custom ops
# ------------------------------------------------------------------------------------------------------------------
_FwdOut = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _smi_loss_fwd_impl(za: torch.Tensor, zb: torch.Tensor, neg_weight: float, eps: float, transform: str,
                       streaming: bool, block_rows: int, need_grad: bool) -> _FwdOut:
    """Returns (loss, ahat, bhat, stats, diag, H); everything but the loss is saved for the backward.

    stats: (4, N) fp32 = mean_a, rstd_a, mean_b, rstd_b; diag: (2, N) fp32 = phi(rho_ii), phi'(rho_ii);
    H: (N, N) c * phi'(rho) with a zero diagonal in non-streaming mode when a gradient is needed, else empty.
    """
    _check_device(za)
    n, d = za.shape
    cdt = compute_dtype(za.dtype, zb.dtype)
    tid = _TRANSFORM_ID[transform]
    dev = za.device
    ahat = torch.empty((n, d), device=dev, dtype=cdt)
    bhat = torch.empty((n, d), device=dev, dtype=cdt)
    stats = torch.empty((4, n), device=dev, dtype=torch.float32)
    diag = torch.empty((2, n), device=dev, dtype=torch.float32)
    nr, bd, nw = _row_blocks(n, d)
    K._standardize_kernel[(triton.cdiv(n, nr),)](
        za, zb, ahat, bhat, stats, diag, n, d, za.stride(0), za.stride(1), zb.stride(0), zb.stride(1),
        eps, math.log1p(eps), 1.0 / d, TRANSFORM=tid, ROWS=nr, BLOCK_D=bd, num_warps=nw,
    )
    loss = -diag[0].sum(dtype=torch.float64) / n
    write_h = need_grad and not streaming and neg_weight != 0.0
    h = torch.empty((n, n) if write_h else (0,), device=dev, dtype=cdt)
    if neg_weight != 0.0:
        c = _h_scale(cdt, eps, transform)
        rows = n if not streaming else min(block_rows, n)
        part = torch.zeros(triton.cdiv(rows, K.MIN_BLOCK) * triton.cdiv(n, K.MIN_BLOCK), device=dev,
                           dtype=torch.float32)
        off_sum = torch.zeros((), device=dev, dtype=torch.float64)
        for r0 in range(0, n, rows):
            m = min(rows, n - r0)
            if r0:
                part.zero_()
            _launch_rho_tiles(ahat, bhat, h if write_h else stats, part, m, r0, eps, c, tid, write_h, True)
            off_sum += part.sum(dtype=torch.float64)
        loss = loss + off_sum * (neg_weight / (n * (n - 1)))
    return loss.to(torch.float32), ahat, bhat, stats, diag, h


def _smi_loss_fwd_fake(za, zb, neg_weight, eps, transform, streaming, block_rows, need_grad):
    n, d = za.shape
    cdt = compute_dtype(za.dtype, zb.dtype)
    write_h = need_grad and not streaming and neg_weight != 0.0
    return (
        za.new_empty((), dtype=torch.float32),
        za.new_empty((n, d), dtype=cdt),
        za.new_empty((n, d), dtype=cdt),
        za.new_empty((4, n), dtype=torch.float32),
        za.new_empty((2, n), dtype=torch.float32),
        za.new_empty((n, n) if write_h else (0,), dtype=cdt),
    )


def _smi_loss_bwd_impl(grad: torch.Tensor, za: torch.Tensor, zb: torch.Tensor, ahat: torch.Tensor,
                       bhat: torch.Tensor, stats: torch.Tensor, diag: torch.Tensor, h: torch.Tensor, neg_weight: float,
                       eps: float, transform: str, streaming: bool, block_rows: int
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients (d za, d zb) of the loss scaled by the scalar ``grad``."""
    n, d = za.shape
    cdt = ahat.dtype
    dev = za.device
    grad = grad.reshape(1).to(torch.float32)
    dza = torch.empty((n, d), device=dev, dtype=za.dtype)
    dzb = torch.empty((n, d), device=dev, dtype=zb.dtype)
    coef_diag = -1.0 / (n * d)
    if neg_weight == 0.0:
        _launch_std_bwd(za, zb, stats, diag, None, grad, dza, n, 0, 0, 0.0, coef_diag)
        _launch_std_bwd(zb, za, stats, diag, None, grad, dzb, n, 0, 1, 0.0, coef_diag)
        return dza, dzb
    c = _h_scale(cdt, eps, transform)
    coef_off = neg_weight / (n * (n - 1)) / c / d
    if not streaming:
        g = torch.empty((n, d), device=dev, dtype=torch.float32)
        _grad_mm(h, bhat, g)  # off-diagonal part of dL/d ahat (unscaled)
        _launch_std_bwd(za, zb, stats, diag, g, grad, dza, n, 0, 0, coef_off, coef_diag)
        _grad_mm(h.t(), ahat, g)  # off-diagonal part of dL/d bhat (unscaled)
        _launch_std_bwd(zb, za, stats, diag, g, grad, dzb, n, 0, 1, coef_off, coef_diag)
        return dza, dzb
    # streaming: recompute H one row block at a time and consume it at once
    rows = min(block_rows, n)
    tid = _TRANSFORM_ID[transform]
    gb = torch.zeros((n, d), device=dev, dtype=torch.float32)
    hblk = torch.empty((rows, n), device=dev, dtype=cdt)
    ga = torch.empty((rows, d), device=dev, dtype=torch.float32)
    dummy = torch.zeros(1, device=dev, dtype=torch.float32)  # loss partials are not needed here
    for r0 in range(0, n, rows):
        m = min(rows, n - r0)
        hb, gab = hblk[:m], ga[:m]
        _launch_rho_tiles(ahat, bhat, hb, dummy, m, r0, eps, c, tid, True, False)
        _grad_mm(hb, bhat, gab)
        _launch_std_bwd(za, zb, stats, diag, gab, grad, dza, m, r0, 0, coef_off, coef_diag)
        _grad_mm(hb.t(), ahat[r0:r0 + m], gb, accumulate=True)
    del hblk, ga
    _launch_std_bwd(zb, za, stats, diag, gb, grad, dzb, n, 0, 1, coef_off, coef_diag)
    return dza, dzb


def _smi_loss_bwd_fake(grad, za, zb, ahat, bhat, stats, diag, h, neg_weight, eps, transform, streaming, block_rows):
    return torch.empty_like(za, memory_format=torch.contiguous_format), \
        torch.empty_like(zb, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    za, zb, neg_weight, eps, transform, streaming, block_rows, need_grad = inputs
    _, ahat, bhat, stats, diag, h = output
    ctx.save_for_backward(za, zb, ahat, bhat, stats, diag, h)
    ctx.params = (neg_weight, eps, transform, streaming, block_rows)


def _backward(ctx, grad_loss, *unused):
    za, zb, ahat, bhat, stats, diag, h = ctx.saved_tensors
    dza, dzb = _bwd_op(grad_loss, za, zb, ahat, bhat, stats, diag, h, *ctx.params)
    return dza, dzb, None, None, None, None, None, None


if hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_autograd"):  # torch >= 2.4
    smi_loss_fwd = torch.library.custom_op("smi_timm::smi_loss_fwd", mutates_args=())(_smi_loss_fwd_impl)
    smi_loss_fwd.register_fake(_smi_loss_fwd_fake)
    smi_loss_bwd = torch.library.custom_op("smi_timm::smi_loss_bwd", mutates_args=())(_smi_loss_bwd_impl)
    smi_loss_bwd.register_fake(_smi_loss_bwd_fake)
    smi_loss_fwd.register_autograd(_backward, setup_context=_setup_context)
    _fwd_op, _bwd_op = torch.ops.smi_timm.smi_loss_fwd, torch.ops.smi_timm.smi_loss_bwd
    CUSTOM_OP = True
else:  # older torch: same functions behind a torch.autograd.Function (eager only; torch.compile graph-breaks)
    class _SMILossFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            out = _smi_loss_fwd_impl(*inputs)
            _setup_context(ctx, inputs, out)
            for t in out[1:]:
                ctx.mark_non_differentiable(t)
            return out

        @staticmethod
        def backward(ctx, grad_loss, *unused):
            return _backward(ctx, grad_loss)

    def _fwd_op(*inputs):
        return _SMILossFunction.apply(*inputs)

    _bwd_op = _smi_loss_bwd_impl
    CUSTOM_OP = False


# ------------------------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------------------------
def _validate(za, zb, transform, eps, block_rows):
    for name, t in (("za", za), ("zb", zb)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype} (shape {tuple(t.shape)})")
    if za.shape != zb.shape:
        raise ValueError(f"za and zb must have the same shape, got {tuple(za.shape)} and {tuple(zb.shape)}")
    n, d = za.shape
    if n < 2:
        raise ValueError(f"the SMI loss needs a batch of at least 2 rows, got shape {tuple(za.shape)}")
    if d < 2:
        raise ValueError(f"the SMI loss needs at least 2 features per row, got shape {tuple(za.shape)}")
    if za.device != zb.device:
        raise ValueError(f"za and zb must be on the same device, got {za.device} and {zb.device}")
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; valid values: {', '.join(TRANSFORMS)}")
    if transform == "mi" and not eps > 0:
        raise ValueError(f"eps must be > 0 for the 'mi' transform, got {eps}")
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")


# Defaults: the library's (smi_timm.losses.smi.DEFAULT_NEG_WEIGHT / DEFAULT_EPS; kernels import nothing from the
# library, tests/test_kernels.py checks that they agree).
def smi_loss_triton(za: torch.Tensor, zb: torch.Tensor, neg_weight: float = 64.0, eps: float = 1e-3,
                    transform: str = "mi", streaming: Optional[bool] = None,
                    block_rows: Optional[int] = None) -> torch.Tensor:
    """SMI loss of two (N, D) embeddings with the fused Triton kernels; returns an fp32 scalar, differentiable.

    Args:
        za, zb: (N, D) floating tensors (fp32 / fp16 / bf16; any strides), on CUDA (or CPU under TRITON_INTERPRET=1).
        neg_weight: weight of the mean off-diagonal term.
        eps: smoothing of the "mi" transform.
        transform: "mi" or "square".
        streaming: process rows in blocks so the (N, N) matrix is never materialised. None: stream when that matrix
            would exceed 256 MiB in the compute dtype, or when ``block_rows`` is given. False ignores ``block_rows``.
        block_rows: rows per streamed block (default: an (block_rows, N) block of about 64 MiB).
    """
    _validate(za, zb, transform, eps, block_rows)
    n = za.shape[0]
    if streaming is None:
        streaming = block_rows is not None or should_stream(n, compute_dtype(za.dtype, zb.dtype))
    streaming = bool(streaming)
    if block_rows is None:
        block_rows = default_block_rows(n, compute_dtype(za.dtype, zb.dtype))
    need_grad = torch.is_grad_enabled() and (za.requires_grad or zb.requires_grad)
    out = _fwd_op(za, zb, float(neg_weight), float(eps), transform, streaming, int(min(block_rows, n)),
                  bool(need_grad))
    return out[0]
