"""Fused Triton implementation of the SMI loss: one differentiable op whose only output is the loss.

Public entry points: :func:`smi_loss_triton` and :func:`precompile`. See ``docs/kernels.md`` for the design.

Eager calls go through a ``torch.autograd.Function`` whose forward and backward launch the kernels directly: a
call's signature (shapes, dtypes, devices, row0, options) is checked once and maps to its cached launch plans, whose
grids and scalar arguments are computed once too; a forward + backward then costs five tensor allocations and three
kernel launches. Under ``torch.compile`` the same functions run behind the opaque custom ops
``smi_timm::smi_loss_fwd`` / ``smi_timm::smi_loss_bwd`` inside a second autograd.Function, so the graph has no break
and the residuals stay internal.
"""
from __future__ import annotations

import math
import time
from dataclasses import astuple
from typing import List, Optional, Sequence, Tuple

import torch
import triton

from ..errors import ConfigError, InputError
from . import _smi_kernels as K
from ._plan import (
    TRANSFORM_ID,
    TRANSFORMS,
    KernelConfig,
    TileConfig,
    autotune_tiles,
    cdiv,
    compute_dtype,
    default_block_rows,
    h_scale,
    heuristic_config,
    layout,
    should_stream,
)

INTERPRET = K.INTERPRET
_CONTIGUOUS = torch.contiguous_format

__all__ = ["smi_loss_triton", "precompile", "INTERPRET", "TRANSFORMS"]


# ------------------------------------------------------------------------------------------------------------------
# launch plan (cached per shape / dtypes / device / options)
# ------------------------------------------------------------------------------------------------------------------
class _Plan:
    """Everything a forward + backward launches, computed once per key."""

    __slots__ = ("n", "ma", "a_row0", "d", "dp", "np_", "cdt", "cfg", "streaming", "rows", "need_grad", "has_off",
                 "lay", "autotune", "dev",
                 "eps", "log1p_eps", "inv_d", "inv_d2", "inv_n", "c", "coef_loss", "coef_grad", "tid", "prec",
                 "std_grid", "std_meta", "std_mid", "std_tail", "rho_meta", "write_h", "sums", "grad_meta",
                 "fwd_rho", "grad_full", "blocks", "f32", "scalar", "like_ws_c", "like_ws_f", "like_h", "like_acc")


def _capability(index: int) -> Optional[Tuple[int, int]]:
    return torch.cuda.get_device_capability(index) if index >= 0 else None


def _config_tuple(config: Optional[KernelConfig]) -> Tuple[int, ...]:
    if config is None:
        return ()
    if not isinstance(config, KernelConfig):
        raise ConfigError(f"config must be a smi_timm.kernels.KernelConfig or None, got {type(config).__name__}")
    return astuple(config.rho) + astuple(config.grad) + (config.rows, config.block_d, config.row_warps)


def _config_from_tuple(t: Sequence[int]) -> Optional[KernelConfig]:
    if not t:
        return None
    t = [int(v) for v in t]
    return KernelConfig(rho=TileConfig(*t[0:7]), grad=TileConfig(*t[7:14]), rows=t[14], block_d=t[15],
                        row_warps=t[16])


def _validate_options(neg_weight, eps, transform, streaming, block_rows):
    if transform not in TRANSFORMS:
        raise ConfigError(f"unknown transform {transform!r}; valid values: {', '.join(TRANSFORMS)}")
    if not isinstance(eps, (int, float)) or (transform == "mi" and not eps > 0):
        raise ConfigError(f"eps must be > 0 for the 'mi' transform, got {eps!r}")
    if not isinstance(neg_weight, (int, float)) or not math.isfinite(neg_weight):
        raise ConfigError(f"neg_weight must be a finite number, got {neg_weight!r}")
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
        raise ConfigError(f"block_rows must be a positive int, got {block_rows!r}")
    if streaming is not None and not isinstance(streaming, bool):
        raise ConfigError(f"streaming must be None, True or False, got {streaming!r}")


def _build_plan(n, ma, a_row0, d, dta, dtb, dev, neg_weight, eps, transform, streaming, block_rows, allow_tf32,
                autotune, config, need_grad) -> _Plan:
    """The plan of the loss of ``za`` rows [a_row0, a_row0 + ma) against all ``n`` rows of ``zb`` (the square
    loss: ``ma = n``, ``a_row0 = 0``)."""
    _validate_options(neg_weight, eps, transform, streaming, block_rows)
    p = _Plan()
    p.ma, p.a_row0 = int(ma), int(a_row0)
    cdt = compute_dtype(dta, dtb)
    if streaming is None:
        streaming = block_rows is not None or should_stream(n, d, cdt)
    if block_rows is None:
        block_rows = default_block_rows(n, cdt)
    cfg = _config_from_tuple(config) or heuristic_config(n, d, cdt, _capability(dev), allow_tf32=allow_tf32,
                                                         interpret=INTERPRET)
    p.n, p.d, p.cdt, p.cfg, p.need_grad, p.autotune = n, d, cdt, cfg, need_grad, bool(autotune)
    p.streaming = bool(streaming)
    p.rows = min(block_rows, ma) if p.streaming else ma
    p.has_off = float(neg_weight) != 0.0
    p.lay = lay = layout(n, d, cfg, streaming=p.streaming, block_rows=p.rows, need_grad=need_grad,
                         has_off=p.has_off, autotune=p.autotune, ma=ma)
    p.dp, p.np_ = lay.dp, lay.np_
    p.eps, p.log1p_eps = float(eps), math.log1p(float(eps))
    p.inv_d, p.inv_d2, p.inv_n = 1.0 / d, 1.0 / (d * d), 1.0 / n
    p.c = h_scale(cdt, float(eps), transform)
    p.coef_loss = float(neg_weight) / (n * (n - 1))
    p.coef_grad = p.coef_loss / p.c  # G_ij = coef_grad * H_ij
    p.tid = TRANSFORM_ID[transform]
    p.prec = "tf32" if (cdt == torch.float32 and allow_tf32) else "ieee"
    p.std_grid = (cdiv(n, cfg.rows),)
    p.std_meta = dict(TRANSFORM=p.tid, ROWS=cfg.rows, BLOCK_D=cfg.block_d, num_warps=cfg.row_warps)
    p.sums = need_grad and p.has_off
    p.write_h = p.sums and not p.streaming
    rho, grad = cfg.rho, cfg.grad
    p.rho_meta = dict(TRANSFORM=p.tid, HAS_OFF=p.has_off, DOT_PREC=p.prec)
    p.grad_meta = dict(HAS_OFF=p.has_off, DOT_PREC=p.prec)
    if not p.autotune:
        p.rho_meta.update(BLOCK_M=rho.block_m, BLOCK_N=rho.block_n, BLOCK_K=rho.block_k, GROUP_M=rho.group_m,
                          SPLIT_K=lay.split, num_warps=rho.num_warps, num_stages=rho.num_stages)
        p.grad_meta.update(BLOCK_M=grad.block_m, BLOCK_N=grad.block_n, BLOCK_K=grad.block_k, GROUP_M=grad.group_m,
                           num_warps=grad.num_warps, num_stages=grad.num_stages)
    p.dev = dev
    p.f32 = torch.float32
    p.scalar = None  # the buffers' prototypes: made by the first launch (precompile needs no device)
    # every launch's grid and scalar arguments, computed once: a call only adds its tensors and strides
    p.std_mid = (n, d, lay.dp, lay.np_)
    p.std_tail = (lay.off_bhat, lay.off_cnt, lay.n_cnt, p.a_row0, p.ma, p.eps, p.log1p_eps, p.inv_d)
    p.fwd_rho = _rho_spec(p, ma, p.a_row0, lay.off_h, int(p.write_h), int(p.sums), 1)
    p.grad_full = _grad_spec(p, ma, p.a_row0, lay.off_h, 0)
    # streaming backward: (rho spec, grad spec) per block of H over side a's rows; the side-b mode of a block says
    # whether its product is the whole one (0), the first (1), a middle (2) or the last (3) of a sum over blocks
    nblk = cdiv(ma, p.rows)
    end = a_row0 + ma
    blocks = []
    for r0 in range(a_row0, end, p.rows):
        m = min(p.rows, end - r0)
        b_mode = 0 if nblk == 1 else (1 if r0 == a_row0 else (3 if r0 + p.rows >= end else 2))
        blocks.append((_rho_spec(p, m, r0, 0, 1, 0, 0), _grad_spec(p, m, r0, 0, b_mode)))
    p.blocks = tuple(blocks)
    return p


def _rho_grid(p: _Plan, m: int):
    if not p.has_off:
        return (1,)
    if p.autotune:
        n = p.n
        return lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]) * meta["SPLIT_K"],)
    rho = p.cfg.rho
    return (cdiv(m, rho.block_m) * cdiv(p.n, rho.block_n) * p.lay.split,)


def _rho_spec(p: _Plan, m, row0, off_h, write_h, sums, do_loss):
    """(grid, scalar arguments) of one launch of the rho kernel over rows [row0, row0 + m)."""
    lay = p.lay
    return _rho_grid(p, m), (m, p.n, p.d, p.dp, p.np_, row0, lay.off_bhat, off_h, lay.off_rowpart, lay.off_colpart,
                             lay.off_lpart, lay.off_split, lay.off_cnt, write_h, sums, do_loss, p.eps, p.log1p_eps,
                             p.inv_d, p.c, p.inv_n, p.coef_loss)


def _grad_spec(p: _Plan, m, row0, off_h, b_mode):
    """{(side_a, side_b): (grid, scalar arguments before the strides, after them)} of one launch of the gradient
    kernel over rows [row0, row0 + m) of H."""
    n, d = p.n, p.d
    mid = (n, d, p.dp, p.np_, m, row0, p.a_row0, p.ma)
    spec = {}
    for side_a, side_b in ((1, 1), (1, 0), (0, 1)):
        if p.autotune:
            def grid(meta, side_a=side_a, side_b=side_b):
                per = cdiv(d, meta["BLOCK_N"])
                return (side_a * cdiv(m, meta["BLOCK_M"]) * per + side_b * cdiv(n, meta["BLOCK_M"]) * per,)
        else:
            g = p.cfg.grad
            per = cdiv(d, g.block_n)
            grid = (side_a * cdiv(m, g.block_m) * per + side_b * cdiv(n, g.block_m) * per,)
        tail = (p.lay.off_bhat, off_h, side_a, b_mode, p.coef_grad, p.inv_n, p.inv_d, p.inv_d2)
        spec[side_a, side_b] = (grid, mid, tail)
    return spec


_PLANS: dict = {}


def _plan(n, ma, a_row0, d, dta, dtb, dev, opts, need_grad) -> _Plan:
    key = (n, ma, a_row0, d, dta, dtb, dev, opts, need_grad)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _build_plan(n, ma, a_row0, d, dta, dtb, dev, *opts, need_grad)
    return plan


# ------------------------------------------------------------------------------------------------------------------
# opt-in autotuning (Triton's autotuner over the candidates of _plan.autotune_tiles)
# ------------------------------------------------------------------------------------------------------------------
_TUNERS: dict = {}


def _interpreter_bench(kernel_call, quantiles):
    """Under the interpreter timings mean nothing: run every candidate once (correctness) and keep the first."""
    kernel_call()
    return [0.0, 0.0, 0.0]


def _tuner(kind: str, plan: _Plan):
    base = plan.cfg.rho if kind == "rho" else plan.cfg.grad
    key = (kind, base)
    tuner = _TUNERS.get(key)
    if tuner is None:
        tiles = autotune_tiles(base, kind == "rho")
        if INTERPRET:  # every candidate runs once under the interpreter: keep two
            tiles = tiles[:2]
        configs = []
        for t in tiles:
            kw = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m)
            if kind == "rho":
                kw["SPLIT_K"] = t.split_k
            configs.append(triton.Config(kw, num_warps=t.num_warps, num_stages=t.num_stages))
        extra = dict(do_bench=_interpreter_bench) if INTERPRET else {}
        if kind == "rho":
            tuner = triton.autotune(configs=configs, key=["M", "N", "D"], **extra)(K.rho_kernel)
        else:  # the streamed side-b products accumulate into acc_ptr: restore it between candidates
            tuner = triton.autotune(configs=configs, key=["M", "N", "D"], restore_value=["acc_ptr"], **extra)(
                K.grad_kernel)
        _TUNERS[key] = tuner
    return tuner


# ------------------------------------------------------------------------------------------------------------------
# launches (``warm=True``: compile only, tensors replaced by their dtypes; used by precompile)
# ------------------------------------------------------------------------------------------------------------------
def _launch_std(p: _Plan, za, zb, ws_c, ws_f, sa, sb, warm=False):
    args = (za, zb, ws_c, ws_f, *p.std_mid, *sa, *sb, *p.std_tail)
    if warm:
        return K.standardize_kernel.warmup(*args, grid=p.std_grid, **p.std_meta)
    K.standardize_kernel[p.std_grid](*args, **p.std_meta)


def _launch_rho(p: _Plan, ws_c, ws_f, h, loss, spec, warm=False):
    kernel = _tuner("rho", p) if p.autotune and p.has_off else K.rho_kernel
    grid, scalars = spec
    if warm:
        return kernel.warmup(ws_c, ws_f, h, loss, *scalars, grid=grid, **p.rho_meta)
    kernel[grid](ws_c, ws_f, h, loss, *scalars, **p.rho_meta)


def _launch_grad(p: _Plan, za, zb, dza, dzb, ws_c, ws_f, h, acc, go, sa, sb, spec, warm=False):
    kernel = _tuner("grad", p) if p.autotune else K.grad_kernel
    grid, mid, tail = spec
    args = (za, zb, dza, dzb, ws_c, ws_f, h, acc, go, *mid, *sa, *sb, *tail)
    if warm:
        return kernel.warmup(*args, grid=grid, **p.grad_meta)
    kernel[grid](*args, **p.grad_meta)


def _prototypes(p: _Plan):
    """Every buffer of a call is allocated like a prototype of its size, dtype and device (a 0-dim tensor, or one
    element expanded with stride 0): empty_like is the cheapest allocation torch offers."""
    device = torch.device("cuda", p.dev) if p.dev >= 0 else torch.device("cpu")
    p.like_ws_c, p.like_h = (torch.empty(1, dtype=p.cdt, device=device).expand(k)
                             for k in (p.lay.ws_c, p.lay.h_block))
    p.like_ws_f, p.like_acc = (torch.empty(1, dtype=torch.float32, device=device).expand(k)
                               for k in (p.lay.ws_f, p.lay.acc or 0))
    p.scalar = torch.empty((), dtype=torch.float32, device=device)


def _forward(p: _Plan, za, zb, defined=False):
    """(loss, ws_c, ws_f): the loss and the residuals of the backward. ``defined``: zero the fp32 workspace first,
    so that no element of the returned tensors is uninitialised (custom-op outputs may be compared)."""
    if p.scalar is None:
        _prototypes(p)
    ws_c = torch.empty_like(p.like_ws_c)
    ws_f = za.new_zeros(p.lay.ws_f, dtype=p.f32) if defined else torch.empty_like(p.like_ws_f)
    loss = torch.empty_like(p.scalar)
    _launch_std(p, za, zb, ws_c, ws_f, za.stride(), zb.stride())
    _launch_rho(p, ws_c, ws_f, ws_c, loss, p.fwd_rho)
    return loss, ws_c, ws_f


def _backward(p: _Plan, go, za, zb, ws_c, ws_f, need_a, need_b):
    """(dza or None, dzb or None) for the upstream gradient ``go`` (a 0-dim tensor, read on the device)."""
    dza = torch.empty_like(za, memory_format=_CONTIGUOUS) if need_a else None
    dzb = torch.empty_like(zb, memory_format=_CONTIGUOUS) if need_b else None
    out_a = dza if need_a else dzb
    out_b = dzb if need_b else dza
    sa, sb = za.stride(), zb.stride()
    sides = (need_a, need_b)  # keys (1, 1), (1, 0), (0, 1): bools hash as those ints
    if not p.streaming:
        _launch_grad(p, za, zb, out_a, out_b, ws_c, ws_f, ws_c, ws_f, go, sa, sb, p.grad_full[sides])
        return dza, dzb
    # streaming: recompute H one block of rows at a time and consume it at once (side b accumulates in fp32)
    if p.scalar is None:
        _prototypes(p)
    h = torch.empty_like(p.like_h)
    acc = torch.empty_like(p.like_acc) if p.lay.acc else ws_f
    for rho_spec, grad_spec in p.blocks:
        _launch_rho(p, ws_c, ws_f, h, ws_f, rho_spec)
        _launch_grad(p, za, zb, out_a, out_b, ws_c, ws_f, h, acc, go, sa, sb, grad_spec[sides])
    return dza, dzb


def _on_device(dev: int, fn, *args):
    """``fn(*args)`` with ``dev`` (a CUDA index, or -1 for the CPU) as the current device: Triton launches on the
    current device, which need not be the one holding the tensors."""
    if dev < 0 or dev == torch.cuda.current_device():
        return fn(*args)
    with torch.cuda.device(dev):
        return fn(*args)


def _check_device(t):
    if t.is_cuda or (INTERPRET and t.device.type == "cpu"):
        return
    raise InputError(
        f"smi_loss_triton runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, set before Triton is "
        f"imported); got a tensor on {t.device}. Use the torch backend of the SMI loss instead."
    )


# ------------------------------------------------------------------------------------------------------------------
# the differentiable op
# ------------------------------------------------------------------------------------------------------------------
def _not_compiling() -> bool:  # torch < 2.3
    return False


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", _not_compiling)


def _eager_grads(ctx, grad):
    za, zb, ws_c, ws_f = ctx.saved_tensors
    needs, plan = ctx.needs_input_grad, ctx.plan
    dza, dzb = _on_device(plan.dev, _backward, plan, grad, za, zb, ws_c, ws_f, needs[0], needs[1])
    return dza, dzb, None


# create_graph=True: the gradients are not differentiable; using them in a second backward raises
_eager_grads_once = torch.autograd.function.once_differentiable(_eager_grads)


class _SMILoss(torch.autograd.Function):
    """Eager calls: the plan comes from the caller's cache of checked signatures."""

    @staticmethod
    def forward(ctx, za, zb, plan):
        loss, ws_c, ws_f = _on_device(plan.dev, _forward, plan, za, zb)
        # saved (not ctx attributes): a backward without retain_graph frees them even while the loss lives on
        ctx.save_for_backward(za, zb, ws_c, ws_f)
        ctx.plan = plan
        return loss

    @staticmethod
    def backward(ctx, grad):  # once_differentiable's no_grad block only where grad mode is on (create_graph)
        return _eager_grads_once(ctx, grad) if torch.is_grad_enabled() else _eager_grads(ctx, grad)


class _SMILossOp(torch.autograd.Function):
    """Under torch.compile: the same forward and backward behind the opaque custom ops (options flattened)."""

    @staticmethod
    def forward(ctx, za, zb, opts, row0, need_grad):
        loss, ws_c, ws_f = torch.ops.smi_timm.smi_loss_fwd(za, zb, row0, *opts, need_grad)
        ctx.save_for_backward(za, zb, ws_c, ws_f)
        ctx.opts, ctx.row0 = opts, row0
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        za, zb, ws_c, ws_f = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dza, dzb = torch.ops.smi_timm.smi_loss_bwd(grad, za, zb, ws_c, ws_f, ctx.row0, *ctx.opts, need_a, need_b)
        return (dza if need_a else None), (dzb if need_b else None), None, None, None


# The custom ops behind the compiled path (torch >= 2.4). Their schema flattens the options.
def _opts_key(neg_weight, eps, transform, streaming, block_rows, allow_tf32, autotune, config):
    return (neg_weight, eps, transform, streaming, block_rows, allow_tf32, autotune, tuple(config))


def _fwd_op_impl(za: torch.Tensor, zb: torch.Tensor, row0: int, neg_weight: float, eps: float, transform: str,
                 streaming: Optional[bool], block_rows: Optional[int], allow_tf32: bool, autotune: bool,
                 config: List[int], need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_device(za)
    opts = _opts_key(neg_weight, eps, transform, streaming, block_rows, allow_tf32, autotune, config)
    dev = za.get_device()
    plan = _plan(zb.shape[0], za.shape[0], row0, za.shape[1], za.dtype, zb.dtype, dev, opts, need_grad)
    return _on_device(dev, _forward, plan, za, zb, True)


def _fwd_op_fake(za, zb, row0, neg_weight, eps, transform, streaming, block_rows, allow_tf32, autotune, config,
                 need_grad):
    (ma, d), n = za.shape, zb.shape[0]
    cdt = compute_dtype(za.dtype, zb.dtype)
    lay = _fake_layout(n, ma, d, cdt, neg_weight, eps, streaming, block_rows, autotune, config, need_grad)
    return za.new_empty((), dtype=torch.float32), za.new_empty(lay.ws_c, dtype=cdt), \
        za.new_empty(lay.ws_f, dtype=torch.float32)


def _fake_layout(n, ma, d, cdt, neg_weight, eps, streaming, block_rows, autotune, config, need_grad):
    # block sizes (hence sizes) do not depend on the compute capability
    cfg = _config_from_tuple(config) or heuristic_config(n, d, cdt, None, interpret=INTERPRET)
    if streaming is None:
        streaming = block_rows is not None or should_stream(n, d, cdt)
    rows = min(block_rows if block_rows is not None else default_block_rows(n, cdt), ma)
    return layout(n, d, cfg, streaming=bool(streaming), block_rows=rows, need_grad=need_grad,
                  has_off=float(neg_weight) != 0.0, autotune=autotune, ma=ma)


def _bwd_op_impl(grad: torch.Tensor, za: torch.Tensor, zb: torch.Tensor, ws_c: torch.Tensor, ws_f: torch.Tensor,
                 row0: int, neg_weight: float, eps: float, transform: str, streaming: Optional[bool],
                 block_rows: Optional[int], allow_tf32: bool, autotune: bool, config: List[int], need_a: bool,
                 need_b: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    opts = _opts_key(neg_weight, eps, transform, streaming, block_rows, allow_tf32, autotune, config)
    dev = za.get_device()
    plan = _plan(zb.shape[0], za.shape[0], row0, za.shape[1], za.dtype, zb.dtype, dev, opts, True)
    dza, dzb = _on_device(dev, _backward, plan, grad, za, zb, ws_c, ws_f, need_a, need_b)
    return (dza if need_a else za.new_empty(0)), (dzb if need_b else zb.new_empty(0))


def _bwd_op_fake(grad, za, zb, ws_c, ws_f, row0, neg_weight, eps, transform, streaming, block_rows, allow_tf32,
                 autotune, config, need_a, need_b):
    return (za.new_empty(za.shape) if need_a else za.new_empty(0)), (zb.new_empty(zb.shape) if need_b else
                                                                      zb.new_empty(0))


CUSTOM_OP = hasattr(torch.library, "custom_op")
if CUSTOM_OP:  # torch >= 2.4
    torch.library.custom_op("smi_timm::smi_loss_fwd", mutates_args=())(_fwd_op_impl).register_fake(_fwd_op_fake)
    torch.library.custom_op("smi_timm::smi_loss_bwd", mutates_args=())(_bwd_op_impl).register_fake(_bwd_op_fake)


# ------------------------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------------------------
def _check_call(za, zb, row0, opts) -> int:
    """Raise a ConfigError / InputError naming what is wrong with a call; its row0 (an int)."""
    for name, t in (("za", za), ("zb", zb)):
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ConfigError(f"{name} must be 2-D (N, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ConfigError(f"{name} must be a floating tensor, got dtype {t.dtype} (shape {tuple(t.shape)})")
    if za.shape[1] != zb.shape[1]:
        raise ConfigError(f"za and zb must have the same number of features, got {tuple(za.shape)} and "
                          f"{tuple(zb.shape)}")
    if za.shape[0] > zb.shape[0]:
        raise ConfigError(f"za has more rows than zb ({tuple(za.shape)} vs {tuple(zb.shape)}): za's rows must be "
                          f"rows of the batch whose view b is zb")
    n, d = zb.shape
    if n < 2 or za.shape[0] < 1:
        raise ConfigError(f"the SMI loss needs a batch of at least 2 rows, got shape {tuple(zb.shape)}")
    if d < 2:
        raise ConfigError(f"the SMI loss needs at least 2 features per row, got shape {tuple(za.shape)}")
    if za.device != zb.device:
        raise ConfigError(f"za and zb must be on the same device, got {za.device} and {zb.device}")
    _check_device(za)
    if row0 is None:
        if za.shape[0] != zb.shape[0]:
            raise ConfigError(f"za and zb must have the same shape, got {tuple(za.shape)} and {tuple(zb.shape)} "
                              f"(or pass row0: za's rows are then rows [row0, row0 + M) of zb's batch)")
        row0 = 0
    if isinstance(row0, bool) or not isinstance(row0, int) or not 0 <= row0 <= zb.shape[0] - za.shape[0]:
        raise ConfigError(f"row0 must be an int in [0, {zb.shape[0] - za.shape[0]}] for za {tuple(za.shape)} and "
                          f"zb {tuple(zb.shape)}, got {row0!r}")
    _validate_options(*opts[:5])
    return int(row0)


def _options(neg_weight, eps, transform, streaming, block_rows, allow_tf32, autotune, config):
    """The options as the plans and the custom ops take them (flags as bools, the config as a tuple)."""
    return (neg_weight, eps, transform, streaming, block_rows, bool(allow_tf32), bool(autotune),
            () if config is None else _config_tuple(config))


# call signature (shapes, dtypes, devices, row0, the options as passed) -> (plan without gradients, plan with
# gradients), for the signatures that passed _check_call
_CHECKED: dict = {}


def _first_call(key, za, zb, row0, options):
    """Check a call of a new signature and build its plans; ``key``: its signature (None where it could not be
    formed: the checks then raise)."""
    opts = _options(*options)
    row0 = _check_call(za, zb, row0, opts)
    dev = za.get_device()
    n, ma, d = zb.shape[0], za.shape[0], za.shape[1]
    plans = (_plan(n, ma, row0, d, za.dtype, zb.dtype, dev, opts, False),
             _plan(n, ma, row0, d, za.dtype, zb.dtype, dev, opts, True))
    try:
        _CHECKED[key] = plans
    except TypeError:  # an unhashable flag (allow_tf32=[1]): valid, checked again on every call
        pass
    return plans


# Defaults: the library's (smi_timm.losses.smi.DEFAULT_NEG_WEIGHT / DEFAULT_EPS; kernels import nothing from the
# library, tests/test_kernels.py checks that they agree).
def smi_loss_triton(za: torch.Tensor, zb: torch.Tensor, neg_weight: float = 64.0, eps: float = 1e-3,
                    transform: str = "mi", streaming: Optional[bool] = None, block_rows: Optional[int] = None, *,
                    allow_tf32: bool = False, autotune: bool = False,
                    config: Optional[KernelConfig] = None, row0: Optional[int] = None) -> torch.Tensor:
    """SMI loss of two (N, D) embeddings with the fused Triton kernels; returns an fp32 scalar, differentiable.

    With ``row0`` (the local-rows form of a loss over ranks), ``za`` holds the rows [row0, row0 + M) of the batch
    whose view b is all of ``zb`` (N rows): the result is that block's share of the batch's loss,
    ``-(1/N)·Σ_{i in block} φ(ρ_{i,i}) + neg_weight/(N(N-1))·Σ_{i in block, j≠i} φ(ρ_ij)``, from the M x N block
    of rho only; the shares of all blocks add up to the loss of the whole batch.

    Args:
        za, zb: (N, D) floating tensors (fp32 / fp16 / bf16 / fp64; any strides), on CUDA (or CPU under
            TRITON_INTERPRET=1); with ``row0``, ``za`` is (M, D), M <= N.
        neg_weight: weight of the mean off-diagonal term.
        eps: smoothing of the "mi" transform.
        transform: "mi" or "square".
        streaming: keep no (N, N) matrix; the backward recomputes it in blocks of rows. None: stream when
            ``block_rows`` is given, or when that matrix would exceed 256 MiB in the compute dtype and streaming
            needs less memory (see ``smi_streaming_peak_bytes``). False ignores ``block_rows``.
        block_rows: rows per streamed block (default: an (block_rows, N) block of about 64 MiB).
        allow_tf32: fp32 inputs only: let the matrix products use TF32 tensor cores (10-bit mantissa operands).
            Off by default: fp32 inputs are computed exactly in fp32, whatever ``torch`` matmul precision is set.
        autotune: pick the tiles of the two matrix-product kernels by timing candidates (Triton's autotuner) on the
            first call of each shape instead of the documented heuristic. Results then depend on the timings, so
            they are no longer bit-identical across processes and ranks.
        config: pin a :class:`~smi_timm.kernels.KernelConfig` (e.g. one found with ``autotune``) instead of the
            heuristic; every process using it gets bit-identical results.
    """
    if _is_compiling():
        opts = _options(neg_weight, eps, transform, streaming, block_rows, allow_tf32, autotune, config)
        row0 = _check_call(za, zb, row0, opts)
        need_grad = torch.is_grad_enabled() and (za.requires_grad or zb.requires_grad)
        return _SMILossOp.apply(za, zb, opts, row0, need_grad)
    # the checks and the plans run once per call signature; a call of a known one is a dict lookup
    key = None
    try:
        key = (za.shape, zb.shape, za.dtype, zb.dtype, za.device, zb.device, type(row0), row0, neg_weight, eps,
               transform, streaming, block_rows, allow_tf32, autotune, config)
        plans = _CHECKED[key]
    except (AttributeError, TypeError, KeyError):  # new, not tensors or not hashable: checked, and then known
        plans = _first_call(key, za, zb, row0, (neg_weight, eps, transform, streaming, block_rows, allow_tf32,
                                                autotune, config))
    if torch.is_grad_enabled() and (za.requires_grad or zb.requires_grad):
        return _SMILoss.apply(za, zb, plans[1])
    return _SMILoss.apply(za, zb, plans[0])


def precompile(n: int, d: int, dtype: torch.dtype, device, *, neg_weight: float = 64.0, eps: float = 1e-3,
               transform: str = "mi", streaming: Optional[bool] = None, block_rows: Optional[int] = None,
               allow_tf32: bool = False, autotune: bool = False, config: Optional[KernelConfig] = None,
               requires_grad: bool = True, zb_dtype: Optional[torch.dtype] = None) -> float:
    """Compile every kernel that ``smi_loss_triton`` launches for a forward + backward of (n, d) embeddings of
    ``dtype`` on ``device`` with these options, without running any; returns the seconds it took.

    Kernels land in Triton's on-disk cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``) and in this
    process's in-memory cache, so a later call of the loss starts at once; with a warm disk cache this costs
    milliseconds. Typical use in a multi-process job: local rank 0 calls it, then a barrier, then the other ranks
    (each loads the kernels from the disk cache instead of compiling them at the same time). It changes no state
    that alters results (no autotuning is run; with ``autotune=True`` every candidate is compiled). Inputs are
    assumed contiguous with 16-byte aligned storage, as tensors from the CUDA allocator are; other strides compile
    their own variant on first use. Under ``TRITON_INTERPRET=1`` (CPU) nothing needs compiling: the launch plan is
    built and checked, and the call returns at once.
    """
    t0 = time.perf_counter()
    n, d = int(n), int(d)
    if n < 2 or d < 2:
        raise ConfigError(f"precompile needs n >= 2 and d >= 2, got n={n}, d={d}")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda" and not (INTERPRET and dev.type == "cpu"):
        raise ConfigError(f"precompile: the fused loss runs on CUDA devices (or the CPU under TRITON_INTERPRET=1), "
                           f"got device {dev}")
    dta, dtb = dtype, zb_dtype or dtype
    for dt in (dta, dtb):
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ConfigError(f"precompile: dtype must be a floating torch.dtype, got {dt!r}")
    opts = _options(neg_weight, eps, transform, streaming, block_rows, allow_tf32, autotune, config)
    plan = _plan(n, n, 0, d, dta, dtb, dev.index if dev.type == "cuda" else -1, opts, bool(requires_grad))
    if dev.type == "cuda" and not INTERPRET:
        with torch.cuda.device(dev):
            for launch in _warm_launches(plan, dta, dtb):
                launch()
    return time.perf_counter() - t0


def _warm_launches(p: _Plan, dta, dtb):
    """The launches of one forward + backward (both gradients) as compile-only calls."""
    f32, cdt, sa, sb = torch.float32, p.cdt, (p.d, 1), (p.d, 1)
    out = [lambda: _launch_std(p, dta, dtb, cdt, f32, sa, sb, warm=True),
           lambda: _launch_rho(p, cdt, f32, cdt, f32, p.fwd_rho, warm=True)]
    if not p.need_grad:
        return out
    if not p.streaming:
        out.append(lambda: _launch_grad(p, dta, dtb, dta, dtb, cdt, f32, cdt, f32, f32, sa, sb, p.grad_full[1, 1],
                                        warm=True))
        return out
    rho_spec, grad_spec = p.blocks[0]
    out.append(lambda: _launch_rho(p, cdt, f32, cdt, f32, rho_spec, warm=True))
    out.append(lambda: _launch_grad(p, dta, dtb, dta, dtb, cdt, f32, cdt, f32, f32, sa, sb, grad_spec[1, 1],
                                    warm=True))
    return out
