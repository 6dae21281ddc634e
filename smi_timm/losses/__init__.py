"""Self-supervised losses: SMI (ours) and the Barlow Twins / VICReg / SimCLR baselines, one loss per module.

``create_loss(name, **kwargs)`` builds any of them by name (``"smi"``, ``"barlow"``, ``"vicreg"``, ``"simclr"``).
"""
from .barlow import BarlowTwinsLoss, barlow_twins_loss
from .simclr import SimCLRLoss, simclr_loss
from .smi import SMILoss, dependency_matrix, smi_loss, smi_loss_reference
from .vicreg import VICRegLoss, vicreg_loss

__all__ = [
    "SMILoss", "smi_loss", "smi_loss_reference", "dependency_matrix",
    "BarlowTwinsLoss", "barlow_twins_loss", "VICRegLoss", "vicreg_loss", "SimCLRLoss", "simclr_loss",
    "LOSSES", "create_loss",
]

LOSSES = {"smi": SMILoss, "barlow": BarlowTwinsLoss, "vicreg": VICRegLoss, "simclr": SimCLRLoss}


def create_loss(name: str, **kwargs):
    """Create a loss module by name: ``smi`` (SMILoss), ``barlow`` (BarlowTwinsLoss), ``vicreg`` (VICRegLoss) or
    ``simclr`` (SimCLRLoss)."""
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid values are: {', '.join(map(repr, LOSSES))}") from None
    return cls(**kwargs)
