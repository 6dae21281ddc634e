"""gather=True under a real 2-process gloo group: DDP-averaged gradients equal one process on the global batch."""
import os
import socket
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
