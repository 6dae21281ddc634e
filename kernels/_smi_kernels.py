"""Triton kernels of the fused SMI loss (launched from :mod:`.smi`; design and algebra in docs/kernels.md).

Three kernels, three launches per forward + backward in non-streaming mode:

* ``standardize_kernel``  ROWS rows per program: per-row mean and inverse std of ``za`` and ``zb`` (fp32), the
  standardised rows written in the compute dtype, the fp32 diagonal correlation rho_ii with phi(rho_ii) and
  phi'(rho_ii), and the row sums of the stored and of the fp32 standardised rows. Program 0 also zeroes the tile
  counters of the workspace.
* ``rho_kernel``          one program per (BLOCK_M x BLOCK_N) tile of rho = ahat @ bhat.T / D (or per split of
  its D reduction) with a fused epilogue: phi of the off-diagonal entries summed into one partial per tile,
  H = c * phi'(rho) (zero on the diagonal) stored in the compute dtype, and the four row / column sums the
  standardisation backward needs (sum_j H_ij sb_j, sum_j H_ij rho_ij and their column twins). Cross-program
  reductions are deterministic: partials are written to the workspace, and the last program to finish a tile row,
  a tile column or the whole matrix (an int32 counter, reset after use) adds them in a fixed order. That program
  also writes the loss.
* ``grad_kernel``         the two gradient products H @ bhat and H.T @ ahat in one launch (programs
  [0, tiles_a) do side a, the rest side b), with the standardisation backward, the diagonal term and the upstream
  gradient applied in the epilogue: dz is written directly in the input dtype.

Every load is cast to fp32 right after ``tl.load``; only the ``tl.dot`` operands stay in the compute dtype.
"""
import triton
import triton.language as tl

# Variance floor of the row standardisation (part of the loss definition).
STD_EPS = 1e-6

INTERPRET = bool(triton.knobs.runtime.interpret)

# Chunk of the fixed-order final reductions.
RED_BLOCK = tl.constexpr(1024)

# Row vectors of the fp32 workspace (index * Np); order of _plan.ROW_VECTORS.
V_MEAN_A = tl.constexpr(0)
V_RSTD_A = tl.constexpr(1)
V_MEAN_B = tl.constexpr(2)
V_RSTD_B = tl.constexpr(3)
V_PHI_D = tl.constexpr(4)
V_DPHI_D = tl.constexpr(5)
V_RHO_D = tl.constexpr(6)
V_SUM_A = tl.constexpr(7)
V_SUM_B = tl.constexpr(8)
V_SUM_A32 = tl.constexpr(9)
V_SUM_B32 = tl.constexpr(10)
V_RA_SB = tl.constexpr(11)
V_RA_RHO = tl.constexpr(12)
V_RB_SA = tl.constexpr(13)
V_RB_RHO = tl.constexpr(14)


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


@triton.jit
def _phi(rho, eps, log1p_eps, TRANSFORM: tl.constexpr):
    if TRANSFORM == 0:
        return 0.5 * (log1p_eps - _log1p(eps - tl.minimum(rho * rho, 1.0)))
    else:
        return 0.5 * rho * rho


@triton.jit
def _dphi(rho, eps, TRANSFORM: tl.constexpr):
    if TRANSFORM == 0:
        r2 = rho * rho
        return tl.where(r2 < 1.0, rho / (1.0 + eps - r2), 0.0)
    else:
        return rho


@triton.jit
def _counters(wsf_ptr, off_cnt):
    return (wsf_ptr + off_cnt).to(tl.pointer_type(tl.int32), bitcast=True)


# ------------------------------------------------------------------------------------------------------------------
# row standardisation (+ diagonal correlation)
# ------------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["N", "a_row0", "Ma"])
def standardize_kernel(
    za_ptr, zb_ptr, wsc_ptr, wsf_ptr,
    N, D, Dp, Np, s_am, s_ad, s_bm, s_bd, off_bhat, off_cnt, n_cnt, a_row0, Ma,
    eps, log1p_eps, inv_D,
    TRANSFORM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """ROWS rows per program (global row index over zb's N rows); loops over D in BLOCK_D chunks (three passes:
    mean, centred variance, write). ``za`` holds the rows [a_row0, a_row0 + Ma) (all N in the square case): the
    other rows of side a are zeros and never read."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    b_ok = rows < N
    row_ok = b_ok & (rows >= a_row0) & (rows < a_row0 + Ma)  # side a
    rows64 = rows.to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    a_rows = za_ptr + (rows64 - a_row0)[:, None] * s_am
    b_rows = zb_ptr + rows64[:, None] * s_bm

    # pass 1: means
    acc_a = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols64 = (d0 + offs).to(tl.int64)
        msk = row_ok[:, None] & ((d0 + offs) < D)[None, :]
        mskb = b_ok[:, None] & ((d0 + offs) < D)[None, :]
        acc_a += tl.load(a_rows + cols64[None, :] * s_ad, mask=msk, other=0.0).to(tl.float32)
        acc_b += tl.load(b_rows + cols64[None, :] * s_bd, mask=mskb, other=0.0).to(tl.float32)
    mean_a = tl.sum(acc_a, axis=1) * inv_D
    mean_b = tl.sum(acc_b, axis=1) * inv_D

    # pass 2: biased variances (centred, two-pass)
    acc_a = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols64 = (d0 + offs).to(tl.int64)
        msk = row_ok[:, None] & ((d0 + offs) < D)[None, :]
        mskb = b_ok[:, None] & ((d0 + offs) < D)[None, :]
        xa = tl.load(a_rows + cols64[None, :] * s_ad, mask=msk, other=0.0).to(tl.float32)
        xb = tl.load(b_rows + cols64[None, :] * s_bd, mask=mskb, other=0.0).to(tl.float32)
        xa = tl.where(msk, xa - mean_a[:, None], 0.0)
        xb = tl.where(mskb, xb - mean_b[:, None], 0.0)
        acc_a += xa * xa
        acc_b += xb * xb
    r_a = 1.0 / tl.sqrt_rn(tl.sum(acc_a, axis=1) * inv_D + 1e-6)
    r_b = 1.0 / tl.sqrt_rn(tl.sum(acc_b, axis=1) * inv_D + 1e-6)

    # pass 3: standardised rows (compute dtype; zero in the padding columns D..Dp), the fp32 diagonal correlation
    # and the row sums of the stored (rounded) and of the fp32 standardised rows
    acc_d = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_a = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_a32 = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_b32 = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, Dp, BLOCK_D):
        cols = d0 + offs
        cols64 = cols.to(tl.int64)
        msk = row_ok[:, None] & (cols < D)[None, :]
        mskb = b_ok[:, None] & (cols < D)[None, :]
        xa = tl.load(a_rows + cols64[None, :] * s_ad, mask=msk, other=0.0).to(tl.float32)
        xb = tl.load(b_rows + cols64[None, :] * s_bd, mask=mskb, other=0.0).to(tl.float32)
        ha = tl.where(msk, (xa - mean_a[:, None]) * r_a[:, None], 0.0)
        hb = tl.where(mskb, (xb - mean_b[:, None]) * r_b[:, None], 0.0)
        ha_c = ha.to(wsc_ptr.dtype.element_ty)
        hb_c = hb.to(wsc_ptr.dtype.element_ty)
        out = rows64[:, None] * Dp + cols64[None, :]
        st = b_ok[:, None] & (cols < Dp)[None, :]
        tl.store(wsc_ptr + out, ha_c, mask=st)
        tl.store(wsc_ptr + off_bhat + out, hb_c, mask=st)
        acc_d += ha * hb
        acc_a += ha_c.to(tl.float32)
        acc_b += hb_c.to(tl.float32)
        acc_a32 += ha
        acc_b32 += hb
    rho = tl.sum(acc_d, axis=1) * inv_D
    phi, dphi = _phi_dphi(rho, eps, log1p_eps, TRANSFORM)

    vec = wsf_ptr + rows
    tl.store(vec + V_MEAN_A * Np, mean_a, mask=b_ok)
    tl.store(vec + V_RSTD_A * Np, r_a, mask=b_ok)
    tl.store(vec + V_MEAN_B * Np, mean_b, mask=b_ok)
    tl.store(vec + V_RSTD_B * Np, r_b, mask=b_ok)
    tl.store(vec + V_PHI_D * Np, phi, mask=b_ok)
    tl.store(vec + V_DPHI_D * Np, dphi, mask=b_ok)
    tl.store(vec + V_RHO_D * Np, rho, mask=b_ok)
    tl.store(vec + V_SUM_A * Np, tl.sum(acc_a, axis=1), mask=b_ok)
    tl.store(vec + V_SUM_B * Np, tl.sum(acc_b, axis=1), mask=b_ok)
    tl.store(vec + V_SUM_A32 * Np, tl.sum(acc_a32, axis=1), mask=b_ok)
    tl.store(vec + V_SUM_B32 * Np, tl.sum(acc_b32, axis=1), mask=b_ok)

    # the tile counters of the rho kernel start at zero (the kernel resets each one after its last use)
    if pid == 0:
        cnt = _counters(wsf_ptr, off_cnt)
        zoffs = tl.arange(0, RED_BLOCK)
        for c0 in range(0, n_cnt, RED_BLOCK):
            tl.store(cnt + c0 + zoffs, tl.zeros([RED_BLOCK], dtype=tl.int32), mask=(c0 + zoffs) < n_cnt)


# ------------------------------------------------------------------------------------------------------------------
# rho tiles with the fused phi / phi' / row-sum / loss epilogue
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _ordered_sum(ptrs, ok, n_parts, stride):
    """sum_{t < n_parts} ptrs[t * stride] in the order t = 0, 1, ... (loads bypass L1: other programs wrote them)."""
    s = tl.zeros(ptrs.shape, dtype=tl.float32)
    for t in range(0, n_parts):
        s += tl.load(ptrs + t * stride, mask=ok, other=0.0, cache_modifier=".cg")
    return s


@triton.jit
def _finish_loss(wsf_ptr, loss_ptr, row0, M, Np, n_parts, off_lpart, inv_N, coef_off, HAS_OFF: tl.constexpr):
    """loss = -sum_i phi(rho_ii) / N + coef_off * sum_t partial_t over the rows [row0, row0 + M), both sums fp64 in
    a fixed order."""
    offs = tl.arange(0, RED_BLOCK)
    diag = tl.zeros([RED_BLOCK], dtype=tl.float64)
    for i0 in range(0, M, RED_BLOCK):
        v = tl.load(wsf_ptr + V_PHI_D * Np + row0 + i0 + offs, mask=(i0 + offs) < M, other=0.0,
                    cache_modifier=".cg")
        diag += v.to(tl.float64)
    loss = -tl.sum(diag, axis=0) * inv_N
    if HAS_OFF:
        off = tl.zeros([RED_BLOCK], dtype=tl.float64)
        for t0 in range(0, n_parts, RED_BLOCK):
            v = tl.load(wsf_ptr + off_lpart + t0 + offs, mask=(t0 + offs) < n_parts, other=0.0,
                        cache_modifier=".cg")
            off += v.to(tl.float64)
        loss += tl.sum(off, axis=0) * coef_off
    tl.store(loss_ptr, loss.to(tl.float32))


@triton.jit(do_not_specialize=["M", "N", "row0", "write_h", "do_sums", "do_loss"])
def rho_kernel(
    wsc_ptr, wsf_ptr, h_ptr, loss_ptr,
    M, N, D, Dp, Np, row0,
    off_bhat, off_h, off_rowpart, off_colpart, off_lpart, off_split, off_cnt,
    write_h, do_sums, do_loss,
    eps, log1p_eps, inv_D, h_scale, inv_N, coef_off,
    TRANSFORM: tl.constexpr, HAS_OFF: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Rows [row0, row0 + M) of rho against all N columns. H (when ``write_h``) is (M, Np) row-major at
    ``h_ptr + off_h`` with block-local rows. The row / column sums (``do_sums``) and the loss (``do_loss``) are
    those of the whole block (every row of side a the launch covers: all N in the square case, a rank's rows for
    the local-rows loss). Without an off-diagonal term (HAS_OFF false) one program writes the loss."""
    if not HAS_OFF:
        _finish_loss(wsf_ptr, loss_ptr, row0, M, Np, 0, off_lpart, inv_N, coef_off, False)
    else:
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        tile = pid // SPLIT_K
        ks = pid % SPLIT_K
        # grouped ordering: consecutive tiles share the same column panel of bhat (L2 reuse)
        group = GROUP_M * num_n
        first_m = (tile // group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + ((tile % group) % size_m)
        pid_n = (tile % group) // size_m

        lrows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # block-local row index
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = lrows + row0  # global row index
        row_ok = lrows < M
        col_ok = cols < N
        valid = row_ok[:, None] & col_ok[None, :]
        lrows64 = lrows.to(tl.int64)
        cols64 = cols.to(tl.int64)

        k_steps = tl.cdiv(tl.cdiv(D, BLOCK_K), SPLIT_K)
        k_lo = ks * k_steps * BLOCK_K
        k_hi = tl.minimum(D, k_lo + k_steps * BLOCK_K)
        ar_k = tl.arange(0, BLOCK_K)
        a_ptrs = wsc_ptr + rows.to(tl.int64)[:, None] * Dp + (k_lo + ar_k)[None, :]
        b_ptrs = wsc_ptr + off_bhat + cols64[None, :] * Dp + (k_lo + ar_k)[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_ok = (k0 + ar_k) < k_hi
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

        cnt = _counters(wsf_ptr, off_cnt)
        tm_all = tl.cdiv(N, BLOCK_M)
        is_last = True
        if SPLIT_K > 1:
            # split-K: every program stores its fp32 partial product; the last one of the tile adds them in order
            # partial of split ks at rows ks * N + lrows of an (SPLIT_K * N, Np) buffer (int64 offsets)
            sp = wsf_ptr + off_split + (lrows64[:, None] + ks * N) * Np + cols64[None, :]
            tl.store(sp, acc, mask=valid)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt + 1 + tm_all + num_n + tile, 1, sem="acq_rel", scope="gpu")
            is_last = arrived == SPLIT_K - 1
        if is_last:
            if SPLIT_K > 1:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for s in range(0, SPLIT_K):
                    sp = wsf_ptr + off_split + (lrows64[:, None] + s * N) * Np + cols64[None, :]
                    acc += tl.load(sp, mask=valid, other=0.0, cache_modifier=".cg")
                tl.store(cnt + 1 + tm_all + num_n + tile, 0)
            # epilogue, ordered to keep few (BLOCK_M x BLOCK_N) temporaries alive at once
            rho = acc * inv_D
            off = valid & (rows[:, None] != cols[None, :])
            if do_loss != 0:
                part = tl.sum(tl.sum(tl.where(off, _phi(rho, eps, log1p_eps, TRANSFORM), 0.0), axis=1), axis=0)
                tl.store(wsf_ptr + off_lpart + tile, part)
            h = tl.where(off, _dphi(rho, eps, TRANSFORM) * h_scale, 0.0).to(wsc_ptr.dtype.element_ty)
            if write_h != 0:
                # columns N..Np are padding: written as zeros
                tl.store(h_ptr + off_h + lrows64[:, None] * Np + cols64[None, :], h,
                         mask=row_ok[:, None] & (cols < Np)[None, :])
            if do_sums != 0:
                hf = h.to(tl.float32)  # the values the gradient products will read
                sb = tl.load(wsf_ptr + V_SUM_B * Np + cols, mask=col_ok, other=0.0)
                rp = wsf_ptr + off_rowpart + pid_n * Np + rows
                tl.store(rp, tl.sum(hf * sb[None, :], axis=1), mask=row_ok)
                sa = tl.load(wsf_ptr + V_SUM_A * Np + rows, mask=row_ok, other=0.0)
                cp = wsf_ptr + off_colpart + pid_m * Np + cols
                tl.store(cp, tl.sum(hf * sa[:, None], axis=0), mask=col_ok)
                hr = hf * rho
                tl.store(rp + num_n * Np, tl.sum(hr, axis=1), mask=row_ok)
                tl.store(cp + num_m * Np, tl.sum(hr, axis=0), mask=col_ok)
                tl.debug_barrier()
                done_r = tl.atomic_add(cnt + 1 + pid_m, 1, sem="acq_rel", scope="gpu")
                if done_r == num_n - 1:  # last tile of this tile row: sum_j over all column tiles, in order
                    base = wsf_ptr + off_rowpart + rows
                    tl.store(wsf_ptr + V_RA_SB * Np + rows, _ordered_sum(base, row_ok, num_n, Np), mask=row_ok)
                    tl.store(wsf_ptr + V_RA_RHO * Np + rows, _ordered_sum(base + num_n * Np, row_ok, num_n, Np),
                             mask=row_ok)
                    tl.store(cnt + 1 + pid_m, 0)
                done_c = tl.atomic_add(cnt + 1 + tm_all + pid_n, 1, sem="acq_rel", scope="gpu")
                if done_c == num_m - 1:  # last tile of this tile column
                    base = wsf_ptr + off_colpart + cols
                    tl.store(wsf_ptr + V_RB_SA * Np + cols, _ordered_sum(base, col_ok, num_m, Np), mask=col_ok)
                    tl.store(wsf_ptr + V_RB_RHO * Np + cols, _ordered_sum(base + num_m * Np, col_ok, num_m, Np),
                             mask=col_ok)
                    tl.store(cnt + 1 + tm_all + pid_n, 0)
            if do_loss != 0:
                tl.debug_barrier()
                done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
                if done == num_m * num_n - 1:  # last tile of all: the loss
                    _finish_loss(wsf_ptr, loss_ptr, row0, M, Np, num_m * num_n, off_lpart, inv_N, coef_off, True)
                    tl.store(cnt, 0)


# ------------------------------------------------------------------------------------------------------------------
# gradient products with the standardisation backward in the epilogue
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _grad_tile(
    t, z_ptr, s_zm, s_zd, o_ptr, s_om, s_od, dz_ptr, wsc_ptr, wsf_ptr, h_ptr, acc_ptr, go_ptr,
    N, D, Dp, Np, M, row0, a_row0, Ma, off_bhat, off_h, b_mode, coef_off, inv_N, inv_D, inv_D2,
    SIDE: tl.constexpr, HAS_OFF: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M rows x BLOCK_N features) tile of dz for side a (SIDE 0: rows row0 + [0, M), product
    H_blk @ bhat) or side b (SIDE 1: rows [0, N), product H_blk.T @ ahat[row0:row0 + M]). ``za`` (and dza) hold the
    global rows [a_row0, a_row0 + Ma): only those b rows have their positive (the diagonal term) in this loss.

    b_mode (side b, streaming over row blocks): 0 = this product is complete; 1 = first block, store it in the
    fp32 accumulator; 2 = add it to the accumulator; 3 = last block, add the accumulator and finish."""
    n_out = M if SIDE == 0 else N
    num_r = tl.cdiv(n_out, BLOCK_M)
    num_f = tl.cdiv(D, BLOCK_N)
    group = GROUP_M * num_f
    first_r = (t // group) * GROUP_M
    size_r = tl.minimum(num_r - first_r, GROUP_M)
    pid_r = first_r + ((t % group) % size_r)
    pid_f = (t % group) // size_r
    lrows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = pid_f * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = lrows < n_out
    f_ok = feats < D
    msk = row_ok[:, None] & f_ok[None, :]
    if SIDE == 0:
        rows = lrows + row0  # global rows of this side's output
    else:
        rows = lrows
    rows64 = rows.to(tl.int64)
    feats64 = feats.to(tl.int64)
    # za / dza hold the global rows [a_row0, a_row0 + Ma): their base pointers are moved back by a_row0 rows (scalar
    # arithmetic; masked lanes are never dereferenced), so that global row indices address them
    if SIDE == 0:
        z_ptr -= a_row0.to(tl.int64) * s_zm
        dz_ptr -= a_row0.to(tl.int64) * D
        o_ok = row_ok
    else:
        o_ptr -= a_row0.to(tl.int64) * s_om
        o_ok = row_ok & (rows >= a_row0) & (rows < a_row0 + Ma)  # b rows whose positive is in this loss

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_OFF:
        offs_k = tl.arange(0, BLOCK_K)
        if SIDE == 0:  # sum_j H[i, j] bhat[j, k]; H's padding columns N..Np are zeros: run j to Np (aligned)
            a_ptrs = h_ptr + off_h + lrows.to(tl.int64)[:, None] * Np + offs_k[None, :]
            b_ptrs = wsc_ptr + off_bhat + offs_k.to(tl.int64)[:, None] * Dp + feats64[None, :]
            a_len = Np
            k_len = N
            a_step = BLOCK_K
        else:  # sum_i H[i, j] ahat[row0 + i, k]
            a_ptrs = h_ptr + off_h + offs_k.to(tl.int64)[None, :] * Np + lrows.to(tl.int64)[:, None]
            b_ptrs = wsc_ptr + (row0 + offs_k).to(tl.int64)[:, None] * Dp + feats64[None, :]
            a_len = M
            k_len = M
            a_step = BLOCK_K * Np
        for k0 in range(0, k_len, BLOCK_K):
            a = tl.load(a_ptrs, mask=row_ok[:, None] & ((k0 + offs_k) < a_len)[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=((k0 + offs_k) < k_len)[:, None] & f_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            a_ptrs += a_step
            b_ptrs += BLOCK_K * Dp

    finish = True
    if SIDE == 1:
        c_ptrs = acc_ptr + rows64[:, None] * Dp + feats64[None, :]
        if b_mode == 1:
            tl.store(c_ptrs, acc, mask=msk)
        elif b_mode == 2:
            tl.store(c_ptrs, acc + tl.load(c_ptrs, mask=msk, other=0.0), mask=msk)
        elif b_mode == 3:
            acc += tl.load(c_ptrs, mask=msk, other=0.0)
        finish = (b_mode == 0) | (b_mode == 3)
    if finish:
        # dz = go * r * (g - mean(g) - xhat * mean(g * xhat)),  g = (coef_off * acc + G_ii * other_hat) / D
        # row vectors of this side / the other side (ROW_VECTORS order: a and b alternate)
        vec = wsf_ptr + rows
        mu = tl.load(vec + (V_MEAN_A + 2 * SIDE) * Np, mask=row_ok, other=0.0)
        r = tl.load(vec + (V_RSTD_A + 2 * SIDE) * Np, mask=row_ok, other=0.0)
        mu_o = tl.load(vec + (V_MEAN_B - 2 * SIDE) * Np, mask=row_ok, other=0.0)
        r_o = tl.load(vec + (V_RSTD_B - 2 * SIDE) * Np, mask=row_ok, other=0.0)
        g_diag = -tl.load(vec + V_DPHI_D * Np, mask=o_ok, other=0.0) * inv_N
        m1 = g_diag * tl.load(vec + (V_SUM_B32 - SIDE) * Np, mask=row_ok, other=0.0) * inv_D2
        m2 = g_diag * tl.load(vec + V_RHO_D * Np, mask=row_ok, other=0.0) * inv_D
        if HAS_OFF:
            m1 += coef_off * tl.load(vec + (V_RA_SB + 2 * SIDE) * Np, mask=row_ok, other=0.0) * inv_D2
            m2 += coef_off * tl.load(vec + (V_RA_RHO + 2 * SIDE) * Np, mask=row_ok, other=0.0) * inv_D
        go = tl.load(go_ptr).to(tl.float32)
        x = tl.load(z_ptr + rows64[:, None] * s_zm + feats64[None, :] * s_zd, mask=msk, other=0.0).to(tl.float32)
        xo = tl.load(o_ptr + rows64[:, None] * s_om + feats64[None, :] * s_od, mask=o_ok[:, None] & f_ok[None, :],
                     other=0.0).to(tl.float32)
        xhat = (x - mu[:, None]) * r[:, None]
        ohat = (xo - mu_o[:, None]) * r_o[:, None]
        g = (coef_off * acc + g_diag[:, None] * ohat) * inv_D
        dz = (go * r)[:, None] * (g - m1[:, None] - xhat * m2[:, None])
        tl.store(dz_ptr + rows64[:, None] * D + feats64[None, :], dz.to(dz_ptr.dtype.element_ty), mask=msk)


@triton.jit(do_not_specialize=["M", "N", "row0", "a_row0", "Ma", "side_a", "b_mode"])
def grad_kernel(
    za_ptr, zb_ptr, dza_ptr, dzb_ptr, wsc_ptr, wsf_ptr, h_ptr, acc_ptr, go_ptr,
    N, D, Dp, Np, M, row0, a_row0, Ma, s_am, s_ad, s_bm, s_bd, off_bhat, off_h, side_a, b_mode,
    coef_off, inv_N, inv_D, inv_D2,
    HAS_OFF: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """With ``side_a`` = 1, programs [0, tiles_a) compute tiles of dza (rows row0 + [0, M)); the others (the grid
    decides whether there are any) compute tiles of dzb (all N rows)."""
    pid = tl.program_id(0)
    tiles_a = side_a * tl.cdiv(M, BLOCK_M) * tl.cdiv(D, BLOCK_N)
    if pid < tiles_a:
        _grad_tile(pid, za_ptr, s_am, s_ad, zb_ptr, s_bm, s_bd, dza_ptr, wsc_ptr, wsf_ptr, h_ptr, acc_ptr, go_ptr,
                   N, D, Dp, Np, M, row0, a_row0, Ma, off_bhat, off_h, 0, coef_off, inv_N, inv_D, inv_D2,
                   0, HAS_OFF, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _grad_tile(pid - tiles_a, zb_ptr, s_bm, s_bd, za_ptr, s_am, s_ad, dzb_ptr, wsc_ptr, wsf_ptr, h_ptr, acc_ptr,
                   go_ptr, N, D, Dp, Np, M, row0, a_row0, Ma, off_bhat, off_h, b_mode, coef_off, inv_N, inv_D,
                   inv_D2, 1, HAS_OFF, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


# The kernels the loss launches.
LAUNCHED = ("standardize_kernel", "rho_kernel", "grad_kernel")
