"""Pretraining with Hugging Face Accelerate: the loop, its configuration, optimisers and checkpoints.

Importing this package imports accelerate lazily (inside :func:`train`).
"""
from .checkpoint import latest_checkpoint, list_checkpoints
from .config import TrainConfig, build_parser, config_from_args
from .loop import NonFiniteLossError, TrainResult, train
from .optim import LARS, build_optimizer, lr_at_step

__all__ = ["TrainConfig", "build_parser", "config_from_args", "train", "TrainResult", "NonFiniteLossError", "LARS",
           "build_optimizer", "lr_at_step", "latest_checkpoint", "list_checkpoints"]
