"""The model zoo. `build(cfg.model)` instantiates a model config and proves it accepts the dataset's input.

The constructors are the `_target_`s of conf/model/ (dlrun.models.LeNet, ...): their names are part of every
stored config, so they stay importable from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dlrun.core.errors import UsageError
from dlrun.models.torchvision_zoo import mobilenet_v2, resnet18
from dlrun.models.zoo import (
    MLP,
    GoogLeNet,
    Inception,
    LeNet,
    Linear,
    Residual,
    ResNet,
    conv_bn_relu,
)

__all__ = [
    "MLP",
    "GoogLeNet",
    "Inception",
    "LeNet",
    "Linear",
    "ResNet",
    "Residual",
    "build",
    "conv_bn_relu",
    "mobilenet_v2",
    "resnet18",
]


def build(model_cfg, input_shape: Sequence[int] | None = None) -> nn.Module:
    """Instantiate a model config and prove it accepts the dataset's input with a dry forward pass."""
    from dlrun.config.compose import instantiate

    model = instantiate(model_cfg, "model")
    shape = tuple(input_shape or model_cfg.input_shape)
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()(torch.zeros(2, *shape))
            model.train(was_training)
    except RuntimeError as exc:
        raise UsageError(
            f"model {model_cfg.get('_target_')} cannot take input of shape {list(shape)}: {str(exc).splitlines()[0]}"
        ) from None
    return model
