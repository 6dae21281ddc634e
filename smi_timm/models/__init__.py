"""Models: the SSL wrapper around timm backbones, timm registry names and weight loading."""
from .ssl import SSLModel, apply_cifar_stem, build_projector, create_ssl_model, parse_projector

__all__ = ["SSLModel", "apply_cifar_stem", "build_projector", "create_ssl_model", "parse_projector"]
