"""gather=True under a real 2-process gloo group: DDP-averaged gradients equal one process on the global batch."""
import importlib.util
import os
import socket
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from smi_timm.losses import BarlowTwinsLoss, SimCLRLoss, SMILoss, VICRegLoss

WORLD = 2
N_LOCAL, D_IN, D_OUT = 6, 10, 12
LOSSES = {
    "smi": lambda gather: SMILoss(neg_weight=4.0, eps=1e-2, gather=gather, backend="torch"),
    # the alternative readings: feature statistics and the log-mean-exp over the global batch
    "smi-feature_row": lambda gather: SMILoss(neg_weight=4.0, eps=1e-2, gather=gather, backend="torch",
                                              standardize="feature_row"),
    "smi-logmeanexp-square": lambda gather: SMILoss(neg_weight=4.0, gather=gather, backend="torch",
                                                    negatives="logmeanexp", transform="square"),
    "simclr": lambda gather: SimCLRLoss(temperature=0.2, gather=gather),
    "barlow": lambda gather: BarlowTwinsLoss(lambd=0.05, gather=gather),
    "vicreg": lambda gather: VICRegLoss(gather=gather),
}


def _inputs():
    g = torch.Generator().manual_seed(0)
    xa = torch.randn(WORLD * N_LOCAL, D_IN, generator=g, dtype=torch.float64)
    xb = xa + 0.3 * torch.randn(WORLD * N_LOCAL, D_IN, generator=g, dtype=torch.float64)
    return xa.float(), xb.float()


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Linear(16, D_OUT))


def _single_process(loss_name):
    xa, xb = _inputs()
    model = _model()
    za_in = xa.clone().requires_grad_(True)
    zb_in = xb.clone().requires_grad_(True)
    loss = LOSSES[loss_name](False)(model(za_in), model(zb_in))
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()], za_in.grad.clone(), zb_in.grad.clone()


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        xa, xb = _inputs()
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        for loss_name, make_loss in LOSSES.items():
            model = nn.parallel.DistributedDataParallel(_model())
            xa_local = xa[sl].clone().requires_grad_(True)
            xb_local = xb[sl].clone().requires_grad_(True)
            loss = make_loss(True)(model(xa_local), model(xb_local))
            loss.backward()
            torch.save({"loss": loss.item(), "grads": [p.grad for p in model.parameters()],
                        "ga": xa_local.grad, "gb": xb_local.grad},
                       os.path.join(out_dir, f"{loss_name}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results():
    """Run every loss once in a 2-process gloo group (one spawn for the whole module)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
        yield {(name, r): torch.load(os.path.join(out_dir, f"{name}-rank{r}.pt"))
               for name in LOSSES for r in range(WORLD)}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_gather_matches_global_batch(loss_name, distributed_results):
    ref_loss, ref_grads, ref_ga, ref_gb = _single_process(loss_name)
    for rank in range(WORLD):
        res = distributed_results[(loss_name, rank)]
        # every rank computed the global-batch loss
        assert res["loss"] == pytest.approx(ref_loss, abs=1e-5)
        # DDP has averaged the parameter gradients: they equal the single-process gradients
        for got, want in zip(res["grads"], ref_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        # each rank's inputs receive world_size × their share (summed over the ranks' identical losses)
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        torch.testing.assert_close(res["ga"] / WORLD, ref_ga[sl], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res["gb"] / WORLD, ref_gb[sl], atol=1e-5, rtol=1e-4)


def test_gather_without_process_group_is_local():
    xa, xb = _inputs()
    assert SMILoss(gather=True)(xa, xb).item() == pytest.approx(SMILoss(gather=False)(xa, xb).item())


# ---------------------------------------------------------------------------------------------------------------------
# gather=True by local rows: no rank forms a product larger than its n x D rows by the D x N gathered columns
# ---------------------------------------------------------------------------------------------------------------------

N_SHAPES, D_SHAPES = 5, 7  # odd sizes: n != D, N = WORLD * n


def _products(fn):
    """(m, k, n) of every matrix product dispatched while ``fn`` runs (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    mm = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in mm:
                a, b = (args[1], args[2]) if func == torch.ops.aten.addmm.default else (args[0], args[1])
                seen.append((a.shape[-2], a.shape[-1], b.shape[-1]))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def _shape_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(rank)
        out = {}
        for loss_name, make_loss in LOSSES.items():
            za = torch.randn(N_SHAPES, D_SHAPES, generator=g, requires_grad=True)
            zb = (za.detach() + 0.3 * torch.randn(N_SHAPES, D_SHAPES, generator=g)).requires_grad_(True)
            loss_fn = make_loss(True)
            out[loss_name] = _products(lambda f=loss_fn, a=za, b=zb: f(a, b).backward())
        torch.save(out, os.path.join(out_dir, f"shapes-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_forms_only_the_local_block():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_shape_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(out_dir, f"shapes-rank{r}.pt")) for r in range(WORLD)]
    n, d, n_total = N_SHAPES, D_SHAPES, WORLD * N_SHAPES
    feature_level = {"barlow", "vicreg"}
    for rank, per_loss in enumerate(results):
        assert set(per_loss) == {"smi", "smi-feature_row", "smi-logmeanexp-square", "simclr"} | feature_level
        for loss_name, products in per_loss.items():
            assert products, (loss_name, "no matrix product recorded")
            worst = max(products, key=lambda p: p[0] * p[1] * p[2])
            if loss_name in feature_level:
                # D x n by n x D: this rank's rows only (the D x D matrix is all-reduced), 1/W of the global batch
                assert worst[0] * worst[1] * worst[2] <= d * n * d, (rank, loss_name, worst, products)
                assert (d, n, d) in products, (rank, loss_name, products)
                continue
            # n x D by D x N: 1/W of the full N x N matrix
            assert worst[0] * worst[1] * worst[2] <= n * d * n_total, (rank, loss_name, worst, products)
            # the forward's block of rho: this rank's n rows against all N columns
            assert (n, d, n_total) in products, (rank, loss_name, products)


def _triton_worker(rank, port, out_dir):
    """The fused kernels (under the Triton interpreter on a CPU run) with gather=True: the launches' shapes, the
    value and the gradients."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        from smi_timm.losses.smi import _load_kernels

        kern = sys.modules[_load_kernels().__name__ + "._smi_kernels"]
        launches = []

        class Recording:  # kernel[grid](*args): records (kernel, M rows of side a, N columns) from the arguments
            def __init__(self, name, kernel, m_at, n_at):
                self.name, self.kernel, self.m_at, self.n_at = name, kernel, m_at, n_at

            def __getitem__(self, grid):
                def launch(*args, **meta):
                    launches.append((self.name, args[self.m_at], args[self.n_at]))
                    return self.kernel[grid](*args, **meta)
                return launch

        # rho_kernel(ws_c, ws_f, h, loss, M, N, ...); grad_kernel(za, zb, dza, dzb, ws_c, ws_f, h, acc, go, N, D, Dp,
        # Np, M, ...)
        kern.rho_kernel = Recording("rho", kern.rho_kernel, 4, 5)
        kern.grad_kernel = Recording("grad", kern.grad_kernel, 13, 9)
        xa, xb = _inputs()
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        za = xa[sl].clone().requires_grad_(True)
        zb = xb[sl].clone().requires_grad_(True)
        loss = SMILoss(neg_weight=4.0, eps=1e-2, gather=True, backend="triton")(za, zb)
        loss.backward()
        torch.save({"loss": loss.item(), "ga": za.grad, "gb": zb.grad, "launches": launches},
                   os.path.join(out_dir, f"triton-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="needs Triton (run under its interpreter on a CPU)")
def test_gather_with_the_fused_kernels_by_local_rows():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_triton_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(out_dir, f"triton-rank{r}.pt")) for r in range(WORLD)]
    xa, xb = _inputs()
    a, b = xa.clone().requires_grad_(True), xb.clone().requires_grad_(True)
    ref = SMILoss(neg_weight=4.0, eps=1e-2, backend="torch")(a, b)
    ref.backward()
    for rank, res in enumerate(results):
        assert res["loss"] == pytest.approx(ref.item(), abs=1e-5)  # every rank reports the global loss
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        torch.testing.assert_close(res["ga"] / WORLD, a.grad[sl], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res["gb"] / WORLD, b.grad[sl], atol=1e-5, rtol=1e-4)
        # every launch: this rank's N_LOCAL rows against the WORLD * N_LOCAL gathered columns, never N x N
        assert res["launches"] and all(m == N_LOCAL and n == WORLD * N_LOCAL for _, m, n in res["launches"]), \
            res["launches"]
