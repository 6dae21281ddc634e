"""Self-supervised losses: SMI (ours) and the Barlow Twins / VICReg / SimCLR baselines, one loss per module.

``create_loss(name, **kwargs)`` builds any of them by name; :data:`LOSSES` is the registry (display names and
hyper-parameters, read from each loss's constructor and docstring: :mod:`smi_timm.losses.registry`). A new loss is
one module here and one ``LOSSES.register`` line below; :func:`gather_with_grad` and :func:`all_reduce_with_grad` are
the differentiable collectives the losses' ``gather=True`` forms are built from.
"""
from ._common import all_reduce_with_grad, gather_with_grad
from .barlow import BarlowTwinsLoss, barlow_twins_loss
from .registry import HParam, LossEntry, LossRegistry
from .simclr import SimCLRLoss, simclr_loss
from .smi import SMILoss, dependency_matrix, smi_loss, smi_loss_reference
from .vicreg import VICRegLoss, vicreg_loss

__all__ = [
    "SMILoss", "smi_loss", "smi_loss_reference", "dependency_matrix",
    "BarlowTwinsLoss", "barlow_twins_loss", "VICRegLoss", "vicreg_loss", "SimCLRLoss", "simclr_loss",
    "LOSSES", "create_loss", "LossEntry", "LossRegistry", "HParam", "gather_with_grad", "all_reduce_with_grad",
]

LOSSES = LossRegistry()
LOSSES.register("smi", SMILoss, "SMI")
LOSSES.register("barlow", BarlowTwinsLoss, "Barlow Twins")
LOSSES.register("vicreg", VICRegLoss, "VICReg")
LOSSES.register("simclr", SimCLRLoss, "SimCLR")


def create_loss(name: str, **kwargs):
    """Create a registered loss module by name (``smi``, ``barlow``, ``vicreg``, ``simclr``, ...) with its
    hyper-parameters (and ``gather``) as keyword arguments."""
    gather = kwargs.pop("gather", None)
    return LOSSES[name].create(kwargs, gather=gather)
