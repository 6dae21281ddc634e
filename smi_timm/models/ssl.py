"""The self-supervised model: any timm backbone followed by a Barlow-Twins-style projector.

``create_ssl_model("resnet50")`` gives ``backbone`` (a timm model created with ``num_classes=0``, so its forward
returns pooled features) and ``projector`` (``Linear(no bias) - BatchNorm1d - ReLU`` blocks and a final ``Linear``).
``forward(x)`` returns ``(features, embeddings)``; the SSL losses consume the embeddings.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import timm
import torch
from torch import nn

from ..errors import ConfigError, InputError

__all__ = ["SSLModel", "create_ssl_model", "build_projector", "parse_projector", "apply_cifar_stem"]


def parse_projector(spec: Union[str, Sequence[int], None]) -> List[int]:
    """Parse ``"2048-2048-2048"`` (or a list of ints) into layer widths. ``""``/``None``/``"none"`` → no projector."""
    if spec is None:
        return []
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("", "none", "identity"):
            return []
        try:
            dims = [int(p) for p in text.replace(",", "-").split("-") if p.strip()]
        except ValueError:
            raise ConfigError(
                f"projector spec {spec!r} is not a '-'-separated list of widths; use e.g. '2048-2048-2048' or 'none'"
            ) from None
    else:
        dims = [int(d) for d in spec]
    if any(d < 1 for d in dims):
        raise ConfigError(f"projector widths must be positive integers, got {dims}")
    return dims


def build_projector(in_dim: int, dims: Sequence[int]) -> nn.Module:
    """``Linear(no bias) - BN - ReLU`` for every hidden width, then a final ``Linear`` (no bias, as in Barlow Twins)."""
    if not dims:
        return nn.Identity()
    layers: List[nn.Module] = []
    prev = in_dim
    for width in dims[:-1]:
        layers += [nn.Linear(prev, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        prev = width
    layers.append(nn.Linear(prev, dims[-1], bias=False))
    return nn.Sequential(*layers)


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Give a timm ResNet a 3x3 stride-1 stem without max-pool (the usual stem for 32x32 inputs), in place."""
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ConfigError(
            f"cifar_stem=True needs a timm ResNet-family backbone with a single `conv1` and a `maxpool` "
            f"(e.g. resnet18, resnet50); {type(model).__name__} has a different stem. For ViTs pass "
            f"img_size/patch_size instead (e.g. img_size=32, patch_size=4); for other families use cifar_stem=False."
        )
    model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


class SSLModel(nn.Module):
    """A timm backbone and a projector. ``forward(x) -> (features, embeddings)``."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, *, backbone_name: str = "", cifar_stem: bool = False,
                 projector_spec: str = ""):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.backbone_name = backbone_name
        self.cifar_stem = cifar_stem
        self.projector_spec = projector_spec

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    @property
    def embedding_dim(self) -> int:
        """Width of the embeddings the losses consume (the projector's output, or the features without one)."""
        dims = parse_projector(self.projector_spec)
        return dims[-1] if dims else self.num_features

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        if features.ndim != 2:
            raise InputError(
                f"backbone {self.backbone_name!r} returned features of shape {tuple(features.shape)}; expected "
                f"(batch, features). Create it with a global pool (timm's default for num_classes=0)."
            )
        return features, self.projector(features)


def create_ssl_model(backbone: str, projector: Union[str, Sequence[int], None] = "2048-2048-2048",
                     cifar_stem: bool = False, **timm_kwargs) -> SSLModel:
    """Create an :class:`SSLModel` from any timm model name.

    Args:
        backbone: a timm model name (``resnet50``, ``vit_small_patch16_224``, ``convnext_tiny``, ...).
        projector: widths as ``"2048-2048-2048"`` (hidden ... output) or ``"none"``.
        cifar_stem: replace a ResNet stem by a 3x3 stride-1 conv without max-pool (for 32x32 images).
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``patch_size``, ``drop_path_rate``, ...).
            ``num_classes`` is always 0: the backbone returns pooled features.
    """
    if "num_classes" in timm_kwargs and timm_kwargs["num_classes"] not in (0, None):
        raise ConfigError("create_ssl_model builds a headless backbone; do not pass num_classes (it is always 0)")
    timm_kwargs.pop("num_classes", None)
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('.')[0][:8]}*")[:8]
        raise ConfigError(f"unknown timm model {backbone!r}. Similar names: {close}; see timm.list_models().")
    model = timm.create_model(backbone, num_classes=0, **timm_kwargs)
    if cifar_stem:
        apply_cifar_stem(model)
    dims = parse_projector(projector)
    spec = "-".join(str(d) for d in dims) if dims else "none"
    return SSLModel(model, build_projector(model.num_features, dims), backbone_name=backbone, cifar_stem=cifar_stem,
                    projector_spec=spec)
