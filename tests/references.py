"""Independent float64 reference of the SMI formula shared by the kernel test modules (autograd for gradients)."""
import math

import torch

from smi_timm.losses.smi import DEFAULT_EPS, DEFAULT_NEG_WEIGHT  # the library's default values only, no code


def reference_loss(za, zb, neg_weight=DEFAULT_NEG_WEIGHT, eps=DEFAULT_EPS, transform="mi"):
    a, b = za.double(), zb.double()

    def std(x):
        return (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-6)

    n, d = a.shape
    rho = std(a) @ std(b).t() / d
    if transform == "mi":
        phi = 0.5 * math.log(1 + eps) - 0.5 * torch.log(1 + eps - torch.clamp(rho * rho, max=1.0))
    else:
        phi = 0.5 * rho * rho
    eye = torch.eye(n, dtype=torch.bool, device=rho.device)
    return -phi[eye].sum() / n + neg_weight * phi[~eye].sum() / (n * (n - 1))
