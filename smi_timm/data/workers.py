"""Loader worker processes: who may stop them, and how nothing is left behind.

The rules:

* Workers ignore SIGINT: Ctrl-C reaches the whole foreground process group, and the training process decides when
  to stop (it saves a checkpoint first).
* Workers ignore a SIGTERM sent to the process group too (a scheduler's ``scancel``, ``kill -TERM -PGID``), for the
  same reason, but exit at once on SIGTERM once their parent has asked them to stop (a flag in shared memory) or
  has died. So ``DataLoader``'s own fallback (``terminate()``) works when the parent shuts them down.
* A worker busy reading shards checks the flag and its parent a few times per second and exits when asked or
  orphaned; an idle worker notices a dead parent through ``DataLoader``'s watchdog.
* The training process shuts its workers down explicitly on every exit path of an iterator (:meth:`WorkerPool.close`
  from a generator's ``finally``, ``loader.close()``), and an ``atexit`` hook registered after multiprocessing's (so
  it runs first) closes every pool still open and kills workers that have not exited after a short grace period.
  Nothing waits forever at interpreter exit: multiprocessing's own exit handler would SIGTERM daemonic children and
  then join them without a timeout.
"""
from __future__ import annotations

import atexit
import functools
import os
import signal
import threading
import time
import weakref
from typing import Optional

__all__ = ["WorkerPool", "check_worker", "close_all", "keep_freed_memory"]

#: Seconds a worker gets to exit on its own after the parent asked, before it is killed.
GRACE_SECONDS = 3.0
_CHECK_EVERY = 0.2

_state = {"flag": None, "parent": None, "last": 0.0}


def _should_exit() -> bool:
    flag, parent = _state["flag"], _state["parent"]
    return bool(flag is not None and flag.value) or (parent is not None and os.getppid() != parent)


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    if _should_exit():
        os._exit(0)


def keep_freed_memory() -> bool:
    """glibc only: keep freed memory in the heap for reuse instead of returning it to the system after each large
    temporary (glibc maps blocks above 128 KiB - 32 MiB separately and unmaps them on free). Augmentation allocates
    many image-sized temporaries; without this, first-touch page faults cost as much as the arithmetic (measured: the
    CPU path's blur is 35 % faster). Called in loader workers; returns whether it applied."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1
    ok &= libc.mallopt(m_trim_threshold, 512 << 20) == 1
    ok &= libc.mallopt(m_top_pad, 64 << 20) == 1
    return bool(ok)


def _worker_init(flag, worker_id: int) -> None:  # noqa: ARG001 - DataLoader passes the worker id
    _state.update(flag=flag, parent=os.getppid(), last=0.0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    keep_freed_memory()


def check_worker() -> None:
    """Called by the loader streams between samples: in a worker process whose parent asked it to stop or is gone,
    exit now. Cheap (a clock read) and a no-op in the training process."""
    if _state["parent"] is None:
        return
    now = time.monotonic()
    if now - _state["last"] < _CHECK_EVERY:
        return
    _state["last"] = now
    if _should_exit():
        os._exit(0)


class WorkerPool:
    """Iterator over a ``DataLoader`` (``batch_size=None`` unless given) whose workers are always stopped: on
    :meth:`close` (idempotent), when garbage-collected, and at interpreter exit. ``num_workers=0`` loads in this
    process (nothing to stop)."""

    def __init__(self, dataset, num_workers: int, pin_memory: bool = False, prefetch_factor: int = 2,
                 multiprocessing_context=None, **loader_kw):
        from torch.utils.data import DataLoader

        self.num_workers = int(num_workers)
        self._flag = None
        kw = {}
        if self.num_workers > 0:
            import multiprocessing as mp

            ctx = multiprocessing_context
            if isinstance(ctx, str):
                ctx = mp.get_context(ctx)
            self._flag = (ctx or mp).RawValue("b", 0)
            kw = dict(prefetch_factor=prefetch_factor, worker_init_fn=functools.partial(_worker_init, self._flag))
            if multiprocessing_context is not None:
                kw["multiprocessing_context"] = multiprocessing_context
        loader_kw.setdefault("batch_size", None)
        loader = DataLoader(dataset, num_workers=self.num_workers, pin_memory=pin_memory, **kw, **loader_kw)
        self._it = iter(loader)
        if self.num_workers > 0:
            _register(self)

    def __iter__(self) -> "WorkerPool":
        return self

    def __next__(self):
        if self._it is None:
            raise StopIteration
        return next(self._it)

    def close(self, grace: float = GRACE_SECONDS) -> None:
        """Stop the workers: ask (flag), let ``DataLoader`` shut them down, then SIGTERM (honoured now) and finally
        SIGKILL whatever is still alive after ``grace`` seconds."""
        it, self._it = self._it, None
        if it is None:
            return
        _live.discard(self)
        if self._flag is not None:
            self._flag.value = 1
        workers = list(getattr(it, "_workers", ()))
        try:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        finally:
            deadline = time.monotonic() + grace
            for w in workers:
                if w.is_alive():
                    w.terminate()
            for w in workers:
                w.join(timeout=max(0.0, deadline - time.monotonic()))
                if w.is_alive():
                    w.kill()
                    w.join(timeout=1.0)

    def __del__(self):
        try:
            self.close(grace=1.0)
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


_live: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()
_hooked = False
_lock = threading.Lock()


def _register(pool: WorkerPool) -> None:
    global _hooked
    with _lock:
        if not _hooked:
            import multiprocessing.util  # noqa: F401 - its exit handler is registered first, so ours runs before it

            atexit.register(close_all)
            _hooked = True
        _live.add(pool)


def close_all(grace: Optional[float] = None) -> None:
    """Close every open :class:`WorkerPool` of this process (the ``atexit`` hook)."""
    for pool in list(_live):
        try:
            pool.close(GRACE_SECONDS if grace is None else grace)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
