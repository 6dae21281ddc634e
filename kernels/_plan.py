"""Launch plan of the fused SMI loss: tile configurations and workspace layout (pure Python, no Triton).

Everything the kernels allocate and every tile configuration they launch with is decided here, from the shapes,
dtypes and options only, so that the memory model (:mod:`._memory`), ahead-of-time compilation
(:func:`smi_timm.kernels.precompile`) and the loss itself share one source of truth.

Tile heuristic (``heuristic_config``; no run-time autotuning unless asked for):

* rho tiles (rho = ahat @ bhat.T plus the phi / phi' epilogue), fp16 / bf16 operands: 128 x 128 when the N x N
  matrix has at least 32 such tiles (N > 640), else 64 x 64; fp32 operands: 64 x 64. When there are few tiles
  (small N), the D reduction is split over ``split_k`` programs per tile (a power of two <= 8, at most ~128 programs
  in all, every split at least 256 features long); the last program of a tile adds the fp32 partial products in a
  fixed order.
* gradient products (H @ bhat and H.T @ ahat with the standardisation backward in the epilogue), fp16 / bf16:
  128 x 128 output tiles when both sides together have at least 64 of them, else 64 x 64; fp32: 64 x 64.
* BLOCK_K, warps and pipeline stages follow the operands and the compute capability: fp16 / bf16 use BLOCK_K = 64,
  8 warps for 128 x 128 tiles and 4 for 64 x 64; TF32 BLOCK_K = 32 and 4 warps; IEEE fp32 (FMA units) BLOCK_K = 32,
  8 warps, 2 stages. Pipeline stages: 4 on sm_90 / sm_100 (227 KiB of shared memory per block), 3 on sm_80
  (163 KiB), 2 elsewhere. (These keep every kernel free of register spills on sm_90: tests/test_kernels.py.)
* row kernel (standardisation): 4K-element program chunks, BLOCK_D = 256 (D <= 256), 1024 (D <= 1024) or 2048.

Block sizes and ``split_k`` depend on (N, D, dtype) only, so the workspace (and the memory model) does not depend on
the GPU; under ``TRITON_INTERPRET=1`` a few large tiles are used instead (the interpreter pays per program).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..errors import ConfigError

TRANSFORMS = ("mi", "square")
TRANSFORM_ID = {"mi": 0, "square": 1}

# Every workspace region and every row stride is a multiple of ALIGN elements (aligned, vectorisable loads).
ALIGN = 16
# Per-row fp32 vectors kept by the forward (see ROW_VECTORS): their count.
ROW_VECTORS = ("mean_a", "rstd_a", "mean_b", "rstd_b", "phi_diag", "dphi_diag", "rho_diag", "sum_ahat", "sum_bhat",
               "sum_ahat32", "sum_bhat32", "ra_sb", "ra_rho", "rb_sa", "rb_rho")
N_VEC = len(ROW_VECTORS)
# Non-streaming mode keeps the N x N matrix H in the compute dtype; above this size the loss streams by default.
STREAM_THRESHOLD_BYTES = 256 * 1024 * 1024
# Default size of one streamed (block_rows x N) H block.
DEFAULT_BLOCK_BYTES = 64 * 1024 * 1024
# Largest fp16 value H may reach (2**14 leaves headroom below the fp16 maximum 65504).
FP16_H_MAX = 2.0 ** 14
# Programs the small-N heuristics aim at (about one wave on an H100 / H200, two on smaller GPUs).
TARGET_PROGRAMS = 132
# Block sizes the autotuner may pick (the workspace is sized for the smallest).
AUTOTUNE_BLOCKS = (64, 128)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, m: int) -> int:
    return cdiv(a, m) * m


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Operand dtype of the tl.dot calls: fp16 / bf16 when every input has that dtype, else fp32."""
    if all(d == torch.float16 for d in dtypes):
        return torch.float16
    if all(d == torch.bfloat16 for d in dtypes):
        return torch.bfloat16
    return torch.float32


def default_block_rows(n: int, dtype: torch.dtype) -> int:
    """Rows per streamed block: the (block_rows x N) H block fits in DEFAULT_BLOCK_BYTES, multiple of 128."""
    s_c = compute_dtype(dtype).itemsize
    rows = DEFAULT_BLOCK_BYTES // max(1, n * s_c)
    rows = max(128, (rows // 128) * 128)
    return int(min(rows, n))


def h_scale(cdt: torch.dtype, eps: float, transform: str) -> float:
    """Power-of-two factor c with H = c * phi'(rho) representable in the compute dtype.

    |phi'| <= 1/eps for "mi" (|rho| <= 1) and <= ~1 for "square"; only fp16 can overflow.
    """
    if cdt != torch.float16:
        return 1.0
    bound = (1.0 / eps) if transform == "mi" else 2.0
    if bound <= FP16_H_MAX:
        return 1.0
    return 2.0 ** math.floor(math.log2(FP16_H_MAX / bound))


# ------------------------------------------------------------------------------------------------------------------
# tile configurations
# ------------------------------------------------------------------------------------------------------------------
def _pow2(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and (x & (x - 1)) == 0


@dataclass(frozen=True)
class TileConfig:
    """Tiling of one matrix-product kernel: (BLOCK_M x BLOCK_N) output tiles, BLOCK_K reduction steps,
    ``split_k`` programs per output tile (reduced in a fixed order), Triton's ``num_warps`` / ``num_stages``, and
    ``group_m`` tile rows per L2-friendly group."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    group_m: int = 8

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not _pow2(v) or v < 16:
                raise ConfigError(f"TileConfig.{name} must be a power of two >= 16 (tl.dot needs 16), got {v!r}")
        for name in ("num_warps", "split_k", "group_m"):
            if not _pow2(getattr(self, name)):
                raise ConfigError(f"TileConfig.{name} must be a power of two, got {getattr(self, name)!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ConfigError(f"TileConfig.num_stages must be a positive int, got {self.num_stages!r}")


@dataclass(frozen=True)
class KernelConfig:
    """Complete launch configuration of the fused loss.

    ``rho``: tiles of rho = ahat @ bhat.T (forward, and the recomputation of streamed H blocks in the backward);
    ``grad``: tiles of the gradient products (``split_k`` must be 1); ``rows`` / ``block_d`` / ``row_warps``: the
    row-standardisation kernel (rows per program, features per chunk, warps)."""

    rho: TileConfig
    grad: TileConfig
    rows: int = 2
    block_d: int = 2048
    row_warps: int = 8

    def __post_init__(self):
        if self.grad.split_k != 1:
            raise ConfigError(f"KernelConfig.grad.split_k must be 1, got {self.grad.split_k}")
        for name in ("rows", "block_d", "row_warps"):
            if not _pow2(getattr(self, name)):
                raise ConfigError(f"KernelConfig.{name} must be a power of two, got {getattr(self, name)!r}")
        if self.rows * self.block_d < 32:
            raise ConfigError(f"KernelConfig.rows * block_d must be >= 32, got {self.rows} * {self.block_d}")


def _smem_rich(capability: Tuple[int, int]) -> bool:
    """GPUs with >= 160 KiB shared memory per block: A100 (sm_80), H100 / H200 (sm_90), B200 (sm_100)."""
    return capability == (8, 0) or capability[0] >= 9


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _row_blocks(n: int, d: int, interpret: bool) -> Tuple[int, int, int]:
    """(rows, block_d, warps) of the row kernel. GPU: 4K-element chunks, block_d in {256, 1024, 2048} (few compiled
    variants); the interpreter: one 256K-element chunk where possible (it pays per program)."""
    if interpret:
        block_d = max(16, min(_next_pow2(d), 1 << 17))
        return max(2, min(_next_pow2(n), (1 << 18) // block_d)), block_d, 4
    block_d = 256 if d <= 256 else (1024 if d <= 1024 else 2048)
    return 4096 // block_d, block_d, 8


def heuristic_config(n: int, d: int, dtype: torch.dtype, capability: Optional[Tuple[int, int]] = (9, 0), *,
                     allow_tf32: bool = False, interpret: bool = False) -> KernelConfig:
    """The tile configuration the loss uses for (N, D) embeddings of ``dtype`` on a GPU of compute capability
    ``capability`` (see the module docstring for the rules). ``interpret=True``: the configuration used under the
    Triton interpreter (few large tiles)."""
    n, d = int(n), int(d)
    cdt = compute_dtype(dtype)
    rows, block_d, row_warps = _row_blocks(n, d, interpret)
    if interpret:
        tile = TileConfig(128, 128, 128, num_warps=4, num_stages=1)
        return KernelConfig(rho=tile, grad=tile, rows=rows, block_d=block_d, row_warps=row_warps)
    cap = tuple(capability) if capability is not None else (9, 0)
    stages = (4 if cap[0] >= 9 else 3) if _smem_rich(cap) else 2
    if cdt != torch.float32:  # fp16 / bf16 operands: tensor cores
        bm = 128 if cdiv(n, 128) ** 2 >= 32 else 64
        gm = 128 if 2 * cdiv(n, 128) * cdiv(d, 128) >= 64 else 64
        block_k, warps, g_warps = 64, (8 if bm == 128 else 4), (8 if gm == 128 else 4)
    elif allow_tf32:  # TF32 tensor cores; 64 x 64 tiles (128 x 128 ones spill registers in the epilogue)
        bm = gm = 64
        block_k, warps, g_warps = 32, 4, 4
    else:  # IEEE fp32 runs on the FMA units: small tiles, 8 warps, no deep pipeline
        bm = gm = 64
        block_k, warps, g_warps, stages = 32, 8, 8, 2
    tiles = cdiv(n, bm) ** 2
    split = 1
    while split < 8 and tiles * split * 2 <= TARGET_PROGRAMS and cdiv(d, split * 2) >= 256:
        split *= 2
    rho = TileConfig(bm, bm, block_k, num_warps=warps, num_stages=stages, split_k=split)
    grad = TileConfig(gm, gm, block_k, num_warps=g_warps, num_stages=stages)
    return KernelConfig(rho=rho, grad=grad, rows=rows, block_d=block_d, row_warps=row_warps)


def autotune_tiles(base: TileConfig, rho: bool):
    """Candidate tiles of the opt-in autotuner (8): 64 / 128 blocks in both dimensions, the heuristic's BLOCK_K,
    3 or 4 pipeline stages; ``split_k`` stays the heuristic's (it sizes the workspace)."""
    small_warps = base.num_warps if base.block_m * base.block_n <= 64 * 64 else 4
    out = []
    for bm in AUTOTUNE_BLOCKS:
        for bn in AUTOTUNE_BLOCKS:
            for stages in (3, 4):
                warps = 8 if bm * bn >= 128 * 128 else small_warps
                out.append(TileConfig(bm, bn, base.block_k, num_warps=warps, num_stages=stages,
                                      split_k=base.split_k if rho else 1))
    return out


# ------------------------------------------------------------------------------------------------------------------
# workspace layout
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Sizes (elements) and offsets of the buffers of one forward + backward.

    ``ws_c`` (compute dtype): ahat (N x Dp), bhat (N x Dp), then H (N x Np) in non-streaming mode with a gradient.
    ``ws_f`` (fp32): N_VEC per-row vectors of length Np, the rho epilogue's row / column partial sums, the per-tile
    loss partials, the split-K partial products and the int32 tile counters. Backward (streaming only): one
    (R x Np) H block and, when there is more than one block, an fp32 (N x Dp) accumulator of H.T @ ahat.
    """

    n: int
    d: int
    dp: int
    np_: int
    tm: int
    tn: int
    split: int
    ws_c: int
    off_bhat: int
    off_h: int
    ws_f: int
    off_rowpart: int
    off_colpart: int
    off_lpart: int
    off_split: int
    off_cnt: int
    n_cnt: int
    h_block: int
    acc: int


def layout(n: int, d: int, cfg: KernelConfig, *, streaming: bool, block_rows: int, need_grad: bool,
           has_off: bool, autotune: bool = False, ma: Optional[int] = None) -> Layout:
    """The buffers of the loss of ``ma`` rows of side a (default ``n``: the square loss; fewer for a rank's local
    rows) against the ``n`` rows of side b."""
    ma = n if ma is None else int(ma)
    dp, np_ = round_up(d, ALIGN), round_up(n, ALIGN)
    r = min(block_rows, ma)
    bm, bn = (min(AUTOTUNE_BLOCKS),) * 2 if autotune else (cfg.rho.block_m, cfg.rho.block_n)
    tm, tn = cdiv(n, bm), cdiv(n, bn)
    split = cfg.rho.split_k
    sums = need_grad and has_off
    ws_c = 2 * n * dp
    off_h = ws_c
    if sums and not streaming:
        ws_c += ma * np_
    off = N_VEC * np_
    off_rowpart = off
    off += 2 * tn * np_ if sums else 0
    off_colpart = off
    off += 2 * tm * np_ if sums else 0
    off_lpart = off
    off += round_up(tm * tn, ALIGN) if has_off else 0
    off_split = off
    split_used = has_off and split > 1
    off += split * n * np_ if split_used else 0
    off_cnt = off
    n_cnt = (1 + tm + tn + (tm * tn if split_used else 0)) if has_off else 0
    ws_f = off + round_up(n_cnt, ALIGN)
    h_block = r * np_ if (sums and streaming) else 0
    acc = n * dp if (sums and streaming and r < ma) else 0
    return Layout(n=n, d=d, dp=dp, np_=np_, tm=tm, tn=tn, split=split if split_used else 1, ws_c=ws_c,
                  off_bhat=n * dp, off_h=off_h, ws_f=ws_f, off_rowpart=off_rowpart, off_colpart=off_colpart,
                  off_lpart=off_lpart, off_split=off_split, off_cnt=off_cnt, n_cnt=n_cnt, h_block=h_block, acc=acc)


# ------------------------------------------------------------------------------------------------------------------
# memory (the model of docs/kernels.md: every buffer alive at the backward's peak, rounded to 512 bytes)
# ------------------------------------------------------------------------------------------------------------------
GRANULE = 512


def peak_bytes(n: int, d: int, dtype: torch.dtype, streaming: bool, block_rows: int,
               config: Optional[KernelConfig] = None) -> int:
    """Bytes allocated by one forward + ``loss.backward()`` (inputs excluded; ``neg_weight != 0``)."""
    n, d = int(n), int(d)
    cdt = compute_dtype(dtype)
    cfg = config if config is not None else heuristic_config(n, d, cdt, None)
    lay = layout(n, d, cfg, streaming=streaming, block_rows=min(int(block_rows), n), need_grad=True, has_off=True)
    s_c, s_in = cdt.itemsize, dtype.itemsize
    buffers = [s_c * lay.ws_c, 4 * lay.ws_f, 4, 4, n * d * s_in, n * d * s_in]
    if streaming:
        buffers += [s_c * lay.h_block] + ([4 * lay.acc] if lay.acc else [])
    return sum(round_up(max(b, 1), GRANULE) for b in buffers)


def should_stream(n: int, d: int, dtype: torch.dtype) -> bool:
    """Stream by default when the N x N matrix H would exceed STREAM_THRESHOLD_BYTES *and* streaming needs less
    memory (its fp32 N x D accumulator can outweigh H when D is large compared with N)."""
    if n * n * compute_dtype(dtype).itemsize <= STREAM_THRESHOLD_BYTES:
        return False
    return peak_bytes(n, d, dtype, True, default_block_rows(n, dtype)) < peak_bytes(n, d, dtype, False, n)
