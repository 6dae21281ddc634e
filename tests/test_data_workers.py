"""Loader worker processes never keep a process alive: errors end it promptly, a killed parent leaves no worker.

Each test runs a small Python program in a subprocess with a timeout (a hang fails the test instead of the suite).
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

ITERATE = textwrap.dedent("""
    import sys
    from smi_timm.data import make_ssl_loader
    loader = make_ssl_loader(sys.argv[1], batch_size=2, image_size=32, num_workers=int(sys.argv[2]),
                             epoch_samples=10, augment_on=sys.argv[3])
    for a, b in loader:
        pass
""")


def _run(code, *args, timeout=60):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    return r, time.monotonic() - t0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    garbage = tmp / "garbage.tar"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    from smi_timm.data.testing import encode_image

    jpeg = tmp / "photo.tar"  # a JPEG passed as a shard
    jpeg.write_bytes(encode_image(np.zeros((64, 64, 3), dtype=np.uint8)))
    return garbage, jpeg


@pytest.mark.parametrize("which,augment_on,workers", [(0, "cpu", 1), (1, "device", 2)])
def test_unusable_shard_ends_the_process(bad_files, which, augment_on, workers):
    """100 kB of random bytes, or a JPEG passed as a shard: the error, a non-zero exit code, within 30 s (before,
    the process printed the error and then waited forever for its worker at interpreter exit)."""
    r, seconds = _run(ITERATE, bad_files[which], workers, augment_on)
    assert r.returncode != 0 and seconds < 30, (r.returncode, seconds, r.stderr[-2000:])
    assert "shards in a row gave no sample with an image" in r.stderr


def test_exception_in_the_main_process_with_live_workers():
    """The iterator is still referenced by the traceback at exit: the exit hook stops its workers."""
    code = textwrap.dedent("""
        from smi_timm.data import make_ssl_loader
        loader = make_ssl_loader("sample", batch_size=64, image_size=32, augment="cifar", num_workers=2)
        it = iter(loader)
        next(it)
        raise ValueError("the training step failed")
    """)
    r, seconds = _run(code)
    assert r.returncode != 0 and seconds < 30 and "the training step failed" in r.stderr


def test_workers_ignore_group_signals_but_not_a_dead_parent():
    """Workers survive SIGINT / SIGTERM sent to them (as to the whole process group), and exit when the parent is
    SIGKILLed."""
    code = textwrap.dedent("""
        import multiprocessing, time
        from smi_timm.data import make_ssl_loader
        loader = make_ssl_loader("sample", batch_size=64, image_size=32, augment="cifar", num_workers=2)
        it = iter(loader)
        next(it)
        print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)
        time.sleep(1.0)
        assert all(_alive(pid) for pid in pids) and proc.poll() is None
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
