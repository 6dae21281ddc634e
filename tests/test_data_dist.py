"""Two real processes (torch.distributed gloo, set up by accelerate) share uneven shards without hanging."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=True)
    from smi_timm.data import make_ssl_loader, sample_shards

    rank, world = state.process_index, state.num_processes
    shards = sample_shards("train")[:3]  # 3 shards of 1000 samples for 2 ranks
    explicit = make_ssl_loader(shards, batch_size=100, image_size=32, augment="cifar", num_workers=1,
                               rank=rank, world_size=world)
    implicit = make_ssl_loader(shards, batch_size=100, image_size=32, augment="cifar", num_workers=0)
    n = 0
    first = None
    for a, b in explicit:
        t = torch.ones(1)
        dist.all_reduce(t)  # a rank with fewer batches would hang here
        n += 1
        first = a[0, 0, 0, 0].item() if first is None else first
    out = {"rank": rank, "batches": n, "len": len(explicit), "samples": explicit.stats()["samples"],
           "implicit": [implicit.rank, implicit.world_size], "first": first}
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        print("RESULT " + json.dumps(gathered), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    import os
    os._exit(0)  # skip interpreter-exit destructors: gloo's teardown can abort when the peer has already gone
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo over TCP on localhost")
def test_two_ranks_gloo_equal_batches(tmp_path):
    pytest.importorskip("accelerate")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    line = next(x for x in outs[0][0].splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["batches"] == r["len"] == 3000 // (2 * 100) for r in results)
    assert all(r["samples"] == 1500 for r in results)
    assert [r["implicit"] for r in results] == [[0, 2], [1, 2]]  # taken from the process group when not passed
    assert results[0]["first"] != results[1]["first"]  # the ranks see different data / augmentations
