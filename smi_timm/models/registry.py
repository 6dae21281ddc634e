"""timm registry names for SMI-pretrained backbones.

Importing this module (``import smi_timm`` does) registers, in timm's model registry:

==============================  =========================================================================
name                            architecture
==============================  =========================================================================
``smi_resnet18``                timm ``resnet18``
``smi_resnet50``                timm ``resnet50``
``smi_vit_small_patch16_224``   timm ``vit_small_patch16_224``
``smi_resnet18_cifar``          ``resnet18`` with the CIFAR stem (3x3 stride-1 ``conv1``, no max-pool)
``smi_resnet50_cifar``          ``resnet50`` with the CIFAR stem
==============================  =========================================================================

The plain names are the same networks as their timm counterparts; they differ in their default pretrained config
(``num_classes=0``: an SSL backbone has no classifier; where SMI weights are published) and in their weight
loading, which accepts a full ``SSLModel`` state dict (keys ``backbone.*``/``projector.*``) as well as a bare backbone
one and names the offending keys when a file does not fit. The ``*_cifar`` names exist because timm has no option for
the CIFAR stem; ``smi-export`` writes them as ``architecture`` so that ``timm.create_model('local-dir:DIR')`` rebuilds
the right network (after ``import smi_timm``).

Load weights offline with::

    timm.create_model("smi_resnet50", pretrained=True, pretrained_cfg_overlay=dict(file="model.safetensors"),
                      num_classes=10)   # num_classes > 0 adds a freshly initialised classifier

No SMI weights are published yet: ``pretrained=True`` without a ``file`` raises an error instead of returning a random
model or trying the network. When weights are released, their sha256 goes into :data:`PUBLISHED_SHA256` and the
default config's ``hf_hub_id``/``url`` become live.

This module imports only torch, timm and :mod:`smi_timm.models.weights` (the state-dict checks).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_checkpoint_filter_fn
from torch import nn

from ..errors import ConfigError
from .ssl import apply_cifar_stem
from .weights import (
    WeightsMismatchError,
    WeightsNotPublishedError,
    check_state_dict,
    classifier_keys,
    strip_ssl_prefix,
)

__all__ = [
    "HF_ORG",
    "PUBLISHED_SHA256",
    "WeightsMismatchError",
    "WeightsNotPublishedError",
    "SMI_MODELS",
    "CIFAR_ARCHITECTURES",
    "cifar_architecture",
    "published_weights",
    "weights_url",
    "strip_ssl_prefix",
    "check_state_dict",
]

#: Hugging Face organisation under which released weights will live (``HF_ORG/<name>.<tag>/model.safetensors``).
HF_ORG = "smi-timm"

#: ``"name.tag" -> sha256`` of every released weights file. Empty: no SMI weights are published yet.
PUBLISHED_SHA256: Dict[str, str] = {}

#: timm architecture -> registered name of the same architecture with the CIFAR stem.
CIFAR_ARCHITECTURES: Dict[str, str] = {"resnet18": "smi_resnet18_cifar", "resnet50": "smi_resnet50_cifar"}

# name -> default pretrained tag
_DEFAULT_TAGS: Dict[str, str] = {
    "smi_resnet18": "in1k",
    "smi_resnet50": "in1k",
    "smi_vit_small_patch16_224": "in1k",
    "smi_resnet18_cifar": "cifar10",
    "smi_resnet50_cifar": "cifar10",
}
#: All names this module registers.
SMI_MODELS: Tuple[str, ...] = tuple(_DEFAULT_TAGS)


def weights_url(name_tag: str) -> str:
    """Download URL of the released ``model.safetensors`` for ``"name.tag"``."""
    return f"https://huggingface.co/{HF_ORG}/{name_tag}/resolve/main/model.safetensors"


def published_weights(name: str) -> Tuple[str, str]:
    """``(url, sha256)`` of the released weights of ``name`` (``"smi_resnet50"`` or ``"smi_resnet50.in1k"``).

    Raises:
        WeightsNotPublishedError: nothing has been released for that name yet.
    """
    base, _, tag = name.partition(".")
    if base not in _DEFAULT_TAGS:
        raise ConfigError(f"{base!r} is not an smi-timm model; known: {', '.join(SMI_MODELS)}")
    name_tag = f"{base}.{tag or _DEFAULT_TAGS[base]}"
    if name_tag not in PUBLISHED_SHA256:
        raise WeightsNotPublishedError(
            f"no SMI weights have been published for {name_tag} yet, so pretrained=True has nothing to load. "
            f"Pretrain and export your own (smi-pretrain, then smi-export RUN_DIR OUT_DIR) and pass the file: "
            f"torch.hub.load(..., '{base}', weights='OUT_DIR/model.safetensors') or "
            f"timm.create_model('{base}', pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='OUT_DIR/model.safetensors')); "
            f"or use pretrained=False for a random initialisation."
        )
    return weights_url(name_tag), PUBLISHED_SHA256[name_tag]


def cifar_architecture(model_name: str) -> Optional[str]:
    """Registered CIFAR-stem name for a timm architecture (``"resnet18"`` -> ``"smi_resnet18_cifar"``), else None."""
    base = model_name.split(".")[0]
    if base in CIFAR_ARCHITECTURES.values():
        return base
    return CIFAR_ARCHITECTURES.get(base)


def _make_filter(extra: Optional[Callable[..., Dict[str, Any]]] = None) -> Callable[[Dict[str, Any], nn.Module],
                                                                                   Dict[str, Any]]:
    """A timm ``pretrained_filter_fn``: strip SSL prefixes, adapt (e.g. resample ViT position embeddings), drop
    classifier tensors the model cannot take, then check every other key and shape."""

    def _filter(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
        if not isinstance(state_dict, Mapping):
            raise WeightsMismatchError(f"expected a state dict (name -> tensor), got {type(state_dict).__name__}")
        state_dict = strip_ssl_prefix(state_dict)
        if extra is not None:
            state_dict = extra(state_dict, model)
        model_sd = model.state_dict()
        classifier = classifier_keys(model)
        for key in classifier:
            if key in state_dict and (key not in model_sd or state_dict[key].shape != model_sd[key].shape):
                state_dict.pop(key)
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")
        check_state_dict(state_dict, model, name=arch, ignore=classifier)
        return state_dict

    return _filter


# ---------------------------------------------------------------------------------------------------------------------
# model factories
# ---------------------------------------------------------------------------------------------------------------------

def _require_weight_source(variant: str, kwargs: Dict[str, Any]) -> None:
    """Refuse ``pretrained=True`` when the resolved config points only at unpublished weights."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")).to_dict()
    if cfg.get("state_dict") is not None or cfg.get("file") or cfg.get("source") == "local-dir":
        return
    tag = cfg.get("tag") or _DEFAULT_TAGS[variant]
    published_weights(f"{variant}.{tag}")  # raises WeightsNotPublishedError with instructions


def _cifar_resnet(**kwargs) -> ResNet:
    return apply_cifar_stem(ResNet(**kwargs))


def _create_resnet(variant: str, pretrained: bool, cifar: bool, **kwargs) -> ResNet:
    if pretrained:
        _require_weight_source(variant, kwargs)
    return build_model_with_cfg(_cifar_resnet if cifar else ResNet, variant, pretrained,
                                pretrained_filter_fn=_make_filter(), **kwargs)


def _create_vit(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    if pretrained:
        _require_weight_source(variant, kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(VisionTransformer, variant, pretrained,
                                pretrained_filter_fn=_make_filter(_vit_checkpoint_filter_fn),
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


_DESCRIPTION = "SMI self-supervised pretraining (smi-timm); backbone only (num_classes=0)."


def _resnet_cfg(name_tag: str, **kwargs) -> Dict[str, Any]:
    cfg = dict(
        hf_hub_id=f"{HF_ORG}/{name_tag}", url=weights_url(name_tag),
        num_classes=0, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="conv1", classifier="fc",
        license="apache-2.0", description=_DESCRIPTION,
    )
    cfg.update(kwargs)
    return cfg


default_cfgs = generate_default_cfgs({
    "smi_resnet18.in1k": _resnet_cfg("smi_resnet18.in1k"),
    "smi_resnet50.in1k": _resnet_cfg("smi_resnet50.in1k"),
    "smi_resnet18_cifar.cifar10": _resnet_cfg("smi_resnet18_cifar.cifar10", input_size=(3, 32, 32),
                                              pool_size=(4, 4), crop_pct=1.0),
    "smi_resnet50_cifar.cifar10": _resnet_cfg("smi_resnet50_cifar.cifar10", input_size=(3, 32, 32),
                                              pool_size=(4, 4), crop_pct=1.0),
    "smi_vit_small_patch16_224.in1k": dict(
        hf_hub_id=f"{HF_ORG}/smi_vit_small_patch16_224.in1k", url=weights_url("smi_vit_small_patch16_224.in1k"),
        num_classes=0, input_size=(3, 224, 224), pool_size=None, fixed_input_size=True, crop_pct=0.9,
        interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj", classifier="head", license="apache-2.0", description=_DESCRIPTION,
    ),
})


@register_model
def smi_resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 (timm ``resnet18``) for SMI-pretrained weights."""
    return _create_resnet("smi_resnet18", pretrained, False, **dict(dict(block=BasicBlock, layers=(2, 2, 2, 2)),
                                                                    **kwargs))


@register_model
def smi_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 (timm ``resnet50``) for SMI-pretrained weights."""
    return _create_resnet("smi_resnet50", pretrained, False, **dict(dict(block=Bottleneck, layers=(3, 4, 6, 3)),
                                                                    **kwargs))


@register_model
def smi_resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 with the CIFAR stem (3x3 stride-1 ``conv1``, no max-pool) for SMI-pretrained weights."""
    return _create_resnet("smi_resnet18_cifar", pretrained, True, **dict(dict(block=BasicBlock, layers=(2, 2, 2, 2)),
                                                                         **kwargs))


@register_model
def smi_resnet50_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 with the CIFAR stem (3x3 stride-1 ``conv1``, no max-pool) for SMI-pretrained weights."""
    return _create_resnet("smi_resnet50_cifar", pretrained, True, **dict(dict(block=Bottleneck, layers=(3, 4, 6, 3)),
                                                                         **kwargs))


@register_model
def smi_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Small/16 (timm ``vit_small_patch16_224``) for SMI-pretrained weights."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_vit("smi_vit_small_patch16_224", pretrained, **dict(model_args, **kwargs))

