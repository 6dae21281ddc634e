"""Memory model of the fused SMI loss (pure Python, importable without Triton).

The model adds up the buffers the implementation allocates, from the same layout code (:func:`._plan.layout`), so
it is exact by construction: the peak of a forward + backward is reached in the backward, when every buffer below
is alive at once (b = s_c bytes per compute-dtype element: 2 for fp16 / bf16 inputs, else 4; s_in = bytes per
input element; Dp = D and Np = N rounded up to a multiple of 16; T_m = T_n = ceil(N / BLOCK) tiles of the rho
kernel, S its split-K factor; R = min(block_rows, N)):

    ws_c   b * (2 N Dp [+ N Np in non-streaming mode])            ahat, bhat [, H]
    ws_f   4 * (15 Np + 2 T_n Np + 2 T_m Np + ceil16(T_m T_n)       row vectors, row / column partial sums,
                [+ S N Np if S > 1] + ceil16(1 + T_m + T_n [+ T_m T_n if S > 1]))   loss partials, split-K, counters
    loss + the unit gradient of loss.backward()                    2 x 4 bytes
    dza, dzb                                                       2 N D s_in
    streaming only: one H block b R Np, and, when R < N, the fp32 accumulator of H.T @ ahat 4 N Dp

Each buffer is rounded up to the CUDA caching allocator's 512-byte granule. (The allocator may hand a buffer larger
than 1 MiB up to 1 MiB more when the rest of its segment is too small to split; the check in
tests/test_kernels_cuda.py allows for that.)
"""
from typing import Optional

import torch

from ._plan import KernelConfig, default_block_rows, peak_bytes, should_stream

__all__ = ["smi_dense_peak_bytes", "smi_streaming_peak_bytes", "default_block_rows", "should_stream"]


def smi_streaming_peak_bytes(N: int, D: int, block_rows: int, dtype: torch.dtype, *,
                             config: Optional[KernelConfig] = None) -> int:
    """Peak bytes allocated by ``smi_loss_triton(za, zb, streaming=True, block_rows=block_rows)`` plus
    ``loss.backward()`` on top of the inputs (``dtype``: the dtype of ``za`` and ``zb``; ``neg_weight != 0``; the
    default heuristic tiles, or ``config``). Formula in the module docstring and in docs/kernels.md."""
    return peak_bytes(N, D, dtype, True, block_rows, config)


def smi_dense_peak_bytes(N: int, D: int, dtype: torch.dtype, *, config: Optional[KernelConfig] = None) -> int:
    """Peak bytes of the non-streaming mode (same conventions as :func:`smi_streaming_peak_bytes`)."""
    return peak_bytes(N, D, dtype, False, N, config)
