"""What the loop watches without stopping the device: throughput per log window and the loss's health.

Both classes keep their per-step state on the device or in plain Python numbers, so that a training step never
waits for the accelerator; the host reads device values only at log and check steps, which the loop chooses.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch

__all__ = ["ThroughputMeter", "LossHealth", "CollapseMonitor", "rankme_tensor", "normalized_std"]


class ThroughputMeter:
    """Images/s, share of time waiting for the loader, step time and peak accelerator memory, per log window.

    ``waited`` is called around every ``next(loader)``, ``stepped`` after every optimiser step; ``window()`` closes the
    current window (call it right after a host sync, e.g. reading the loss, so that the window's wall time includes
    the device work it queued) and returns its record. ``summary()`` averages every window but the first (compilation,
    cuDNN autotuning and the loader's warm-up make it unrepresentative) once there are several.
    """

    def __init__(self, device: torch.device, images_per_micro_step: int):
        self.device = device
        self.images_per_micro_step = int(images_per_micro_step)
        self.windows: List[Dict[str, float]] = []
        self._reset(time.perf_counter())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def _reset(self, now: float) -> None:
        self._start = now
        self._wait = 0.0
        self._images = 0
        self._steps = 0

    def waited(self, seconds: float) -> None:
        self._wait += seconds

    def micro_step(self) -> None:
        self._images += self.images_per_micro_step

    def stepped(self) -> None:
        self._steps += 1

    def window(self) -> Dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        record = {"images_per_s": round(self._images / elapsed, 2),
                  "data_wait_frac": round(min(1.0, self._wait / elapsed), 4),
                  "step_time_ms": round(1e3 * elapsed / max(1, self._steps), 2)}
        if self.device.type == "cuda":  # allocator statistics: host-side counters, no device sync
            record["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.windows.append(dict(record, seconds=elapsed, steps=self._steps))
        self._reset(now)
        return record

    def summary(self) -> Dict[str, float]:
        """Run averages (time-weighted) over the log windows, the first excluded when there are several."""
        rows = self.windows[1:] if len(self.windows) > 1 else self.windows
        if not rows:
            return {}
        seconds = sum(r["seconds"] for r in rows)
        steps = sum(r["steps"] for r in rows)
        out = {"images_per_s": round(sum(r["images_per_s"] * r["seconds"] for r in rows) / seconds, 2),
               "data_wait_frac": round(sum(r["data_wait_frac"] * r["seconds"] for r in rows) / seconds, 4),
               "step_time_ms": round(1e3 * seconds / max(1, steps), 2),
               "windows": len(rows)}
        peaks = [r["peak_mem_mib"] for r in self.windows if "peak_mem_mib" in r]
        if peaks:
            out["peak_mem_mib"] = max(peaks)
        return out


class LossHealth:
    """Device-side record of the loss: the mean over the current log window and the first non-finite step.

    ``observe(loss, step)`` queues three small device ops and never reads anything back.
    """

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._sum = torch.zeros((), dtype=torch.float32, device=device)
        self._count = 0

    def observe(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        self._sum += loss
        self._count += 1
        self.first_bad = torch.where(torch.isfinite(loss) | (self.first_bad >= 0), self.first_bad, step)

    def window_mean(self) -> torch.Tensor:
        """The mean loss of the micro-steps since the last call (a device scalar; read it with ``.item()``)."""
        mean = self._sum / max(1, self._count)
        self._sum = torch.zeros_like(self._sum)
        self._count = 0
        return mean

    def flags(self, stop_requested: bool) -> torch.Tensor:
        """``[non-finite seen, stop requested]`` as a float device tensor, for an all-reduce (sum) across ranks."""
        return torch.stack([(self.first_bad >= 0).float(),
                            torch.full((), float(stop_requested), device=self.first_bad.device)])

    @staticmethod
    def read(flags: torch.Tensor) -> "tuple[bool, bool]":
        bad, stop = flags.tolist()  # the one host sync of a check step
        return bad > 0, stop > 0

    def first_bad_step(self) -> Optional[int]:
        step = int(self.first_bad.item())
        return step if step >= 0 else None


def rankme_tensor(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RankMe (Garrido et al., 2023) of ``z`` (N, D) as a device scalar: ``exp(entropy(p))`` with
    ``p = sigma / ||sigma||_1 + eps`` for the singular values ``sigma`` of ``z``; between 1 (one direction) and
    ``min(N, D)``."""
    s = torch.linalg.svdvals(z.float())
    p = s / s.sum().clamp_min(1e-30) + eps
    return torch.exp(-(p * p.log()).sum())


def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of the L2-normalised rows of ``z`` (N, D), times sqrt(D): about 1 when the embeddings
    spread over all dimensions, 0 when they collapse to a point (SimSiam's collapse indicator, rescaled)."""
    zn = torch.nn.functional.normalize(z.float(), dim=1)
    return zn.std(dim=0).mean() * zn.shape[1] ** 0.5


class CollapseMonitor:
    """Collapse indicators of the current batch's embeddings at log steps: ``emb_std`` (:func:`normalized_std`) and
    ``emb_rankme`` (:func:`rankme_tensor`), computed on the device and read back together with the loss.

    A warning is printed when ``emb_std < STD_MIN`` or ``emb_rankme < max(RANK_MIN, RANK_FRAC * min(N, D))``: a run
    collapsing to a point, or to a few directions (dimensional collapse), shows it long before its kNN accuracy does.
    """

    STD_MIN = 0.1
    RANK_MIN = 2.0
    RANK_FRAC = 0.01

    KEYS = ("emb_std", "emb_rankme")

    def __init__(self):
        self.embeddings: Optional[torch.Tensor] = None
        self.shape = (0, 0)

    def keep(self, embeddings: torch.Tensor) -> None:
        """Hold (a reference to) one view's embeddings of the step to be logged."""
        self.embeddings = embeddings.detach()
        self.shape = tuple(embeddings.shape)

    def stats(self) -> Optional[torch.Tensor]:
        """``[emb_std, emb_rankme]`` as a device tensor, or None when no embeddings were kept."""
        z, self.embeddings = self.embeddings, None
        if z is None:
            return None
        z = torch.nan_to_num(z.float(), nan=0.0, posinf=0.0, neginf=0.0)  # a diverged step: the loss check reports it
        return torch.stack([normalized_std(z), rankme_tensor(z)])

    def thresholds(self) -> Dict[str, float]:
        n, d = self.shape
        return {"emb_std": self.STD_MIN, "emb_rankme": max(self.RANK_MIN, self.RANK_FRAC * min(n, d))}

    def warning(self, step: int, values: Dict[str, float]) -> Optional[str]:
        limits = self.thresholds()
        low = {k: v for k, v in values.items() if v < limits[k]}
        if not low:
            return None
        parts = ", ".join(f"{k} {v:.3g} < {limits[k]:.3g}" for k, v in low.items())
        return (f"warning: step {step}: the embeddings look collapsed ({parts}); check the learning rate, the loss "
                f"settings and the augmentations (a collapse at a high learning rate can end as the schedule decays "
                f"it, but the run loses the steps in between)")
