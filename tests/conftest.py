"""Test configuration.

Without a CUDA device the Triton kernels run under the Triton interpreter on CPU tensors. The variable must be set
before any Triton kernel module is imported, so it is set here, at collection time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep the suite predictable on small CI machines.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """Small-tensor ops (augmentation): intra-op threads only add overhead, and the loaders run single-threaded too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
