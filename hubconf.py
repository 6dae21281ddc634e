"""torch.hub entry points for smi-timm.

    model = torch.hub.load("<clone or owner/repo>", "smi_resnet50", pretrained=False)              # random init
    model = torch.hub.load("<clone or owner/repo>", "smi_resnet50", weights="model.safetensors")   # your weights

Each entry is ``(pretrained=True, weights=None, num_classes=0, **kwargs)`` and returns a timm model; see
``smi_timm/models/hub.py`` for the details (URLs with ``sha256=``, error messages, safetensors only).
Loading needs only torch, timm and safetensors: the package need not be installed.
"""
dependencies = ["torch", "timm", "safetensors"]

from smi_timm.models.hub import (  # noqa: E402,F401
    smi_resnet18,
    smi_resnet18_cifar,
    smi_resnet50,
    smi_resnet50_cifar,
    smi_vit_small_patch16_224,
)
