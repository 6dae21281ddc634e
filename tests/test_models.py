"""create_ssl_model on several timm families, and the light `import smi_timm`."""
import subprocess
import sys

import pytest
import torch

from smi_timm.models import SSLModel, create_ssl_model, parse_projector


def _fwd_bwd(model, x):
    feats, emb = model(x)
    (emb.float().pow(2).mean() + feats.float().mean()).backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    return feats, emb


@pytest.mark.parametrize("name,kwargs,size,n_feat", [
    ("resnet18", dict(cifar_stem=True), 32, 512),
    ("resnet50", {}, 32, 2048),
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8), 32, 192),
    ("convnext_atto", {}, 32, 320),
    ("efficientnet_b0", {}, 32, 1280),
])
def test_create_ssl_model_forward_backward(name, kwargs, size, n_feat):
    model = create_ssl_model(name, projector="64-32", **kwargs)
    assert isinstance(model, SSLModel) and model.num_features == n_feat
    feats, emb = _fwd_bwd(model, torch.randn(3, 3, size, size))
    assert feats.shape == (3, n_feat) and emb.shape == (3, 32)


def test_cifar_stem_keeps_resolution():
    model = create_ssl_model("resnet18", projector="none", cifar_stem=True)
    assert model.backbone.conv1.kernel_size == (3, 3) and model.backbone.conv1.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    fmap = model.backbone.forward_features(torch.randn(1, 3, 32, 32))
    assert fmap.shape[-1] == 4  # 32 / 8 (three stride-2 stages), not 32 / 32
    assert isinstance(model.projector, torch.nn.Identity)


def test_projector_structure():
    model = create_ssl_model("resnet18", projector="128-128-64")
    layers = list(model.projector)
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert layers[0].in_features == 512 and layers[-1].out_features == 64
    assert all(m.bias is None for m in layers if isinstance(m, torch.nn.Linear))
    assert parse_projector("8192-8192-8192") == [8192] * 3 and parse_projector("none") == []


def test_model_errors():
    with pytest.raises(ValueError, match="cifar_stem=True needs a timm ResNet"):
        create_ssl_model("vit_tiny_patch16_224", cifar_stem=True, img_size=32, patch_size=8)
    with pytest.raises(ValueError, match="unknown timm model 'resnet_does_not_exist'"):
        create_ssl_model("resnet_does_not_exist")
    with pytest.raises(ValueError, match="projector spec"):
        create_ssl_model("resnet18", projector="wide")
    with pytest.raises(ValueError, match="num_classes"):
        create_ssl_model("resnet18", num_classes=10)


def test_import_is_light():
    """`import smi_timm` adds no Triton kernels, webdataset or accelerate on top of what torch/timm load themselves."""
    code = (
        "import sys, timm; before = set(sys.modules); import smi_timm; "
        "new = set(sys.modules) - before; "
        "bad = sorted(m for m in new if m.split('.')[0] in ('triton', 'webdataset', 'accelerate') "
        "or m.startswith('smi_timm.kernels') or m.startswith('smi_timm.data') or m.startswith('smi_timm.train')); "
        "print(bad); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
