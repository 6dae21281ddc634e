"""Memory model of the fused SMI loss (pure Python, importable without Triton)."""
import torch

# Non-streaming mode keeps the N x N matrix H in the compute dtype; above this size the loss streams by default.
STREAM_THRESHOLD_BYTES = 256 * 1024 * 1024
# Default size of one streamed (block_rows x N) H block.
DEFAULT_BLOCK_BYTES = 64 * 1024 * 1024


def compute_dtype(*dtypes):
    """Operand dtype of the tl.dot calls: fp16 / bf16 when every input has that dtype, else fp32."""
    if all(d == torch.float16 for d in dtypes):
        return torch.float16
    if all(d == torch.bfloat16 for d in dtypes):
        return torch.bfloat16
    return torch.float32


def _cdiv(a, b):
    return -(-a // b)


def _size(dtype):
    return torch.empty((), dtype=dtype).element_size()


def default_block_rows(n, dtype):
    """Rows per streamed block: the (block_rows x N) H block fits in DEFAULT_BLOCK_BYTES, multiple of 128."""
    s_c = _size(compute_dtype(dtype))
    rows = DEFAULT_BLOCK_BYTES // max(1, n * s_c)
    rows = max(128, (rows // 128) * 128)
    return int(min(rows, n))


def should_stream(n, dtype):
    return n * n * _size(compute_dtype(dtype)) > STREAM_THRESHOLD_BYTES


def smi_streaming_peak_bytes(N, D, block_rows, dtype):
    """Peak bytes allocated by ``smi_loss_triton(..., streaming=True, block_rows=block_rows)`` over forward + backward,
    on top of the inputs (``dtype``: the dtype of ``za`` and ``zb``).

    The peak is reached in the backward pass; the buffers alive then are (s_c = 2 for fp16/bf16 inputs, else 4;
    s_in = element size of the inputs; R = min(block_rows, N)):

        2*N*D*s_c      standardised rows ahat, bhat (saved by the forward)
      + 24*N           per-row mean / inverse std of both inputs and phi(rho_ii), phi'(rho_ii) (fp32)
      + 2*N*D*s_in     the returned gradients d za, d zb
      + 4*N*D          fp32 accumulator of H^T @ ahat
      + R*N*s_c        one block of H (recomputed)
      + 4*R*D          fp32 H_block @ bhat

    The forward holds only 2*N*D*s_c + 24*N plus a 4*ceil(R/32)*ceil(N/32) byte buffer of loss partial sums (always
    less). The CUDA caching allocator rounds every buffer up to a multiple of 512 bytes.
    """
    N, D = int(N), int(D)
    R = min(int(block_rows), N)
    s_c = _size(compute_dtype(dtype))
    s_in = _size(dtype)
    saved = 2 * N * D * s_c + 24 * N
    fwd = saved + 4 * _cdiv(R, 32) * _cdiv(N, 32)
    bwd = saved + 2 * N * D * s_in + 4 * N * D + R * N * s_c + 4 * R * D
    return max(fwd, bwd)


def smi_dense_peak_bytes(N, D, dtype):
    """Peak bytes of the non-streaming mode (same conventions as :func:`smi_streaming_peak_bytes`).

        backward: 2*N*D*s_c + 24*N + N*N*s_c (H) + 2*N*D*s_in + 4*N*D (one fp32 gradient product at a time)
        forward:  2*N*D*s_c + 24*N + N*N*s_c + 4*ceil(N/32)**2 (loss partial sums)
    """
    N, D = int(N), int(D)
    s_c = _size(compute_dtype(dtype))
    s_in = _size(dtype)
    saved = 2 * N * D * s_c + 24 * N + N * N * s_c
    return max(saved + 4 * _cdiv(N, 32) ** 2, saved + 2 * N * D * s_in + 4 * N * D)
