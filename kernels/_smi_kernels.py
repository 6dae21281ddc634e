"""Triton kernels of the fused SMI loss.

Four kernels (launched from :mod:`.smi`):

* ``_standardize_kernel``  one program per row: per-row mean and inverse std of ``za`` and ``zb`` (fp32), the
  standardised rows written in the compute dtype, and the diagonal correlation rho_ii computed in fp32 together with
  phi(rho_ii) and phi'(rho_ii).
* ``_rho_tile_kernel``     one program per (BLOCK_M x BLOCK_N) tile of rho = ahat @ bhat.T / D (tl.dot, fp32
  accumulation) with a fused epilogue: phi of the off-diagonal entries reduced to one partial sum per program, and
  H = c * phi'(rho) (zero on the diagonal) written in the compute dtype.
* ``_gemm_kernel``         C (+)= A @ B with fp32 output, arbitrary strides (used for H @ bhat and H.T @ ahat when the
  Triton gradient-product backend is selected).
* ``_std_bwd_kernel``      one program per row: backward of the row standardisation, fused with the assembly of the
  gradient w.r.t. the standardised row (off-diagonal product + diagonal term).

Every load is cast to fp32 right after ``tl.load``; only the ``tl.dot`` operands stay in the compute dtype.
"""
import triton
import triton.language as tl

# Variance floor of the row standardisation (part of the loss definition).
STD_EPS = 1e-6

TRANSFORM_MI = 0
TRANSFORM_SQUARE = 1

INTERPRET = bool(triton.knobs.runtime.interpret)


# ------------------------------------------------------------------------------------------------------------------
# autotune configurations
# ------------------------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); every block dim is >= 32 so no tl.dot ever sees a dim < 16.
_TILE_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 2, 4),
    (32, 32, 64, 2, 3),
    (32, 32, 32, 2, 2),
]
# The smallest tile of the list: the loss partial-sum buffer is sized for it.
MIN_BLOCK = 32
# One large configuration used under TRITON_INTERPRET=1 (the interpreter pays per program and per K step).
INTERPRET_TILE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8)
INTERPRET_GEMM = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8)


def _np2(x):
    return triton.next_power_of_2(max(int(x), 1))


def _configs():
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for (m, n, k, w, s) in _TILE_CONFIGS
    ]


def _prune(m_arg, n_arg, k_arg):
    """Drop configurations whose blocks are larger than needed for the problem (the 32^3 one always survives)."""

    def prune(configs, named_args, **kwargs):
        lim_m = max(MIN_BLOCK, _np2(named_args[m_arg]))
        lim_n = max(MIN_BLOCK, _np2(named_args[n_arg]))
        lim_k = max(MIN_BLOCK, _np2(named_args[k_arg]))
        kept = [c for c in configs
                if c.kwargs["BLOCK_M"] <= lim_m and c.kwargs["BLOCK_N"] <= lim_n and c.kwargs["BLOCK_K"] <= lim_k]
        return kept or [configs[-1]]

    return {"early_config_prune": prune}


# ------------------------------------------------------------------------------------------------------------------
# phi and phi'
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _log1p(x):
    """log(1 + x) accurate for small |x| without relying on the accuracy of log near 1:
    2*atanh(s) = 2*(s + s^3/3 + ... + s^11/11) with s = x / (2 + x) when |x| < 0.25 (|s| < 0.143, truncation
    < 1e-11 relative), log(1 + x) otherwise."""
    s = x / (2.0 + x)
    s2 = s * s
    series = 2.0 * s * (1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 / 11.0)))))
    return tl.where(tl.abs(x) < 0.25, series, tl.log(1.0 + x))


@triton.jit
def _phi_dphi(rho, eps, log1p_eps, TRANSFORM: tl.constexpr):
    r2 = rho * rho
    if TRANSFORM == 0:
        # phi = 1/2 log1p(eps) - 1/2 log1p(eps - min(rho^2, 1)); the clamp passes no gradient at rho^2 >= 1
        # (torch.clamp(rho * rho, max=1.0) convention: zero gradient at equality).
        m = tl.minimum(r2, 1.0)
        phi = 0.5 * (log1p_eps - _log1p(eps - m))
        dphi = tl.where(r2 < 1.0, rho / (1.0 + eps - r2), 0.0)
    else:
        phi = 0.5 * r2
        dphi = rho
    return phi, dphi


# ------------------------------------------------------------------------------------------------------------------
# row standardisation (+ diagonal correlation)
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _standardize_kernel(
    za_ptr, zb_ptr, ahat_ptr, bhat_ptr, stats_ptr, diag_ptr,
    N, D, s_am, s_ad, s_bm, s_bd, eps, log1p_eps, inv_D,
    TRANSFORM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """ROWS rows per program; loops over D in BLOCK_D chunks (three passes: mean, centred variance, write)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    a_rows = za_ptr + rows64[:, None] * s_am
    b_rows = zb_ptr + rows64[:, None] * s_bm

    # pass 1: means
    acc_a = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs
        cols64 = cols.to(tl.int64)
        msk = row_ok[:, None] & (cols < D)[None, :]
        acc_a += tl.load(a_rows + cols64[None, :] * s_ad, mask=msk, other=0.0).to(tl.float32)
        acc_b += tl.load(b_rows + cols64[None, :] * s_bd, mask=msk, other=0.0).to(tl.float32)
    mean_a = tl.sum(acc_a, axis=1) * inv_D
    mean_b = tl.sum(acc_b, axis=1) * inv_D

    # pass 2: biased variances (centred, two-pass)
    acc_a = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs
        cols64 = cols.to(tl.int64)
        msk = row_ok[:, None] & (cols < D)[None, :]
        xa = tl.load(a_rows + cols64[None, :] * s_ad, mask=msk, other=0.0).to(tl.float32)
        xb = tl.load(b_rows + cols64[None, :] * s_bd, mask=msk, other=0.0).to(tl.float32)
        xa = tl.where(msk, xa - mean_a[:, None], 0.0)
        xb = tl.where(msk, xb - mean_b[:, None], 0.0)
        acc_a += xa * xa
        acc_b += xb * xb
    r_a = 1.0 / tl.sqrt_rn(tl.sum(acc_a, axis=1) * inv_D + 1e-6)
    r_b = 1.0 / tl.sqrt_rn(tl.sum(acc_b, axis=1) * inv_D + 1e-6)

    # pass 3: standardised rows (compute dtype) and the fp32 diagonal correlation
    acc_d = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs
        cols64 = cols.to(tl.int64)
        msk = row_ok[:, None] & (cols < D)[None, :]
        xa = tl.load(a_rows + cols64[None, :] * s_ad, mask=msk, other=0.0).to(tl.float32)
        xb = tl.load(b_rows + cols64[None, :] * s_bd, mask=msk, other=0.0).to(tl.float32)
        ha = tl.where(msk, (xa - mean_a[:, None]) * r_a[:, None], 0.0)
        hb = tl.where(msk, (xb - mean_b[:, None]) * r_b[:, None], 0.0)
        out = rows64[:, None] * D + cols[None, :]
        tl.store(ahat_ptr + out, ha.to(ahat_ptr.dtype.element_ty), mask=msk)
        tl.store(bhat_ptr + out, hb.to(bhat_ptr.dtype.element_ty), mask=msk)
        acc_d += ha * hb
    rho = tl.sum(acc_d, axis=1) * inv_D
    phi, dphi = _phi_dphi(rho, eps, log1p_eps, TRANSFORM)

    tl.store(stats_ptr + rows, mean_a, mask=row_ok)
    tl.store(stats_ptr + N + rows, r_a, mask=row_ok)
    tl.store(stats_ptr + 2 * N + rows, mean_b, mask=row_ok)
    tl.store(stats_ptr + 3 * N + rows, r_b, mask=row_ok)
    tl.store(diag_ptr + rows, phi, mask=row_ok)
    tl.store(diag_ptr + N + rows, dphi, mask=row_ok)


# ------------------------------------------------------------------------------------------------------------------
# rho tiles with the fused phi / phi' epilogue
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _rho_tile_kernel_impl(
    a_ptr, b_ptr, h_ptr, part_ptr,
    M, N, D, row_offset, eps, log1p_eps, inv_D, h_scale,
    TRANSFORM: tl.constexpr, WRITE_H: tl.constexpr, COMPUTE_LOSS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Rows [row_offset, row_offset + M) of rho against all N columns; H is (M, N) row-major (block-local rows)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: consecutive programs share the same column panel of bhat (L2 reuse)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % size_m)
    pid_n = (pid % group) // size_m

    lrows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # block-local row index
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = lrows + row_offset  # global row index
    row_ok = lrows < M
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * D + offs_k[None, :]
    b_ptrs = b_ptr + cols.to(tl.int64)[None, :] * D + offs_k[:, None]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + offs_k) < D
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    rho = acc * inv_D
    phi, dphi = _phi_dphi(rho, eps, log1p_eps, TRANSFORM)
    off = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
    if COMPUTE_LOSS:
        tl.store(part_ptr + pid, tl.sum(tl.sum(tl.where(off, phi, 0.0), axis=1), axis=0))
    if WRITE_H:
        h = tl.where(off, dphi * h_scale, 0.0)
        h_ptrs = h_ptr + lrows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ------------------------------------------------------------------------------------------------------------------
# C (+)= A @ B, fp32 output
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _gemm_kernel_impl(
    a_ptr, b_ptr, c_ptr, M, P, K,
    s_am, s_ak, s_bk, s_bp, s_cm, s_cp,
    ACCUMULATE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(P, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % size_m)
    pid_n = (pid % group) // size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < P
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * s_am + offs_k.to(tl.int64)[None, :] * s_ak
    b_ptrs = b_ptr + offs_k.to(tl.int64)[:, None] * s_bk + cols.to(tl.int64)[None, :] * s_bp

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk

    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * s_cm + cols.to(tl.int64)[None, :] * s_cp
    c_msk = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_msk, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc, mask=c_msk)


# ------------------------------------------------------------------------------------------------------------------
# standardisation backward (one side), fused with the diagonal term
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _std_bwd_kernel(
    z_ptr, s_zm, s_zd, zo_ptr, s_om, s_od, stats_ptr, diag_ptr, goff_ptr, s_gm, grad_ptr, dz_ptr,
    N, M, D, row_offset, side, coef_off, coef_diag, inv_D,
    HAS_OFF: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows [row_offset, row_offset + M) of dz for one side (side 0: z = za, zo = zb; side 1: the reverse).

    goff holds the off-diagonal product for these M rows (block-local row index), dz is the full (N, D) output.
    g = go * (coef_off * goff[row] + coef_diag * phi'(rho_ii) * other_hat[row])   (gradient w.r.t. xhat)
    dz = r * (g - mean(g) - xhat * mean(g * xhat))                                 (xhat = (z - mu) * r, recomputed)
    """
    lrows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = lrows < M
    rows = lrows + row_offset
    rows64 = rows.to(tl.int64)
    go = tl.load(grad_ptr).to(tl.float32)
    mu = tl.load(stats_ptr + (2 * side) * N + rows, mask=row_ok, other=0.0)
    r = tl.load(stats_ptr + (2 * side + 1) * N + rows, mask=row_ok, other=0.0)
    mu_o = tl.load(stats_ptr + (2 - 2 * side) * N + rows, mask=row_ok, other=0.0)
    r_o = tl.load(stats_ptr + (3 - 2 * side) * N + rows, mask=row_ok, other=0.0)
    cd = go * coef_diag * tl.load(diag_ptr + N + rows, mask=row_ok, other=0.0)
    co = go * coef_off
    offs = tl.arange(0, BLOCK_D)
    z_rows = z_ptr + rows64[:, None] * s_zm
    o_rows = zo_ptr + rows64[:, None] * s_om
    g_rows = goff_ptr + lrows.to(tl.int64)[:, None] * s_gm

    sum_g = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    sum_gx = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs
        cols64 = cols.to(tl.int64)
        msk = row_ok[:, None] & (cols < D)[None, :]
        x = tl.load(z_rows + cols64[None, :] * s_zd, mask=msk, other=0.0).to(tl.float32)
        xo = tl.load(o_rows + cols64[None, :] * s_od, mask=msk, other=0.0).to(tl.float32)
        xhat = tl.where(msk, (x - mu[:, None]) * r[:, None], 0.0)
        g = cd[:, None] * tl.where(msk, (xo - mu_o[:, None]) * r_o[:, None], 0.0)
        if HAS_OFF:
            g += co * tl.load(g_rows + cols[None, :], mask=msk, other=0.0).to(tl.float32)
        sum_g += g
        sum_gx += g * xhat
    mean_g = tl.sum(sum_g, axis=1) * inv_D
    mean_gx = tl.sum(sum_gx, axis=1) * inv_D

    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs
        cols64 = cols.to(tl.int64)
        msk = row_ok[:, None] & (cols < D)[None, :]
        x = tl.load(z_rows + cols64[None, :] * s_zd, mask=msk, other=0.0).to(tl.float32)
        xo = tl.load(o_rows + cols64[None, :] * s_od, mask=msk, other=0.0).to(tl.float32)
        xhat = (x - mu[:, None]) * r[:, None]
        g = cd[:, None] * ((xo - mu_o[:, None]) * r_o[:, None])
        if HAS_OFF:
            g += co * tl.load(g_rows + cols[None, :], mask=msk, other=0.0).to(tl.float32)
        dz = r[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
        tl.store(dz_ptr + rows64[:, None] * D + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=msk)


# Autotuned variants (bypassed under the interpreter, where one large configuration is used).
_rho_tile_kernel_tuned = triton.autotune(
    configs=_configs(), key=["M", "N", "D"], prune_configs_by=_prune("M", "N", "D"),
    reset_to_zero=["part_ptr"],
)(_rho_tile_kernel_impl)

_gemm_kernel_tuned = triton.autotune(
    configs=_configs(), key=["M", "P", "K"], prune_configs_by=_prune("M", "P", "K"),
    restore_value=["c_ptr"],
)(_gemm_kernel_impl)
