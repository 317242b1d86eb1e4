"""The model zoo. `build(cfg.model)` instantiates a model config and proves it accepts the dataset's input.

The constructors are the `_target_`s of conf/model/ (dlrun.models.LeNet, ...): their names are part of every
stored config, so they stay importable from here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from dlrun.core.errors import UsageError
from dlrun.models.recurrent import Recurrent
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

log = logging.getLogger("dlrun")

__all__ = [
    "MLP",
    "GoogLeNet",
    "Inception",
    "LeNet",
    "Linear",
    "Recurrent",
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

    shape = tuple(input_shape or model_cfg.input_shape)
    model = instantiate(_own_model_arguments(model_cfg), "model")
    if not isinstance(model, nn.Module):
        raise UsageError(f"model {model_cfg.get('_target_')} built a {type(model).__name__}, not a torch nn.Module")
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()(torch.zeros(2, *shape, dtype=getattr(model, "input_dtype", torch.float32)))
            model.train(was_training)
    except RuntimeError as exc:
        raise UsageError(
            f"model {model_cfg.get('_target_')} cannot take input of shape {list(shape)}: {str(exc).splitlines()[0]}"
        ) from None
    return model


def _own_model_arguments(model_cfg):
    """A user's own class or factory (`model._target_=my_module.MyNet`) gets only the config keys its signature
    takes: input_shape/num_outputs when it asks for them, and not the keys left over from the default model's
    YAML (lenet's channels...). dlrun's own builders get every key, so a typo there stays an error."""
    import inspect

    from omegaconf import OmegaConf

    from dlrun.config.compose import import_target
    from dlrun.config.trust import builtin_targets

    target = model_cfg.get("_target_")
    if target in builtin_targets():
        return model_cfg
    parameters = inspect.signature(import_target(target, "model")).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return model_cfg
    accepted = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    config = OmegaConf.to_container(model_cfg, resolve=True)
    dropped = sorted(k for k in config if k not in accepted and k != "_target_" and k not in _SIZES)
    typed = [k for k in dropped if k in _typed_model_keys()]
    if typed:  # a key the user typed for this model and the model cannot take: a typo, not a leftover
        raise UsageError(f"model {target} takes no argument {typed[0]!r} (it takes {', '.join(sorted(accepted))})")
    if dropped:
        log.info(f"model {target} does not take {', '.join(dropped)}: not passed")
    return OmegaConf.create({k: v for k, v in config.items() if k in accepted or k == "_target_"})


_SIZES = ("input_shape", "num_outputs")  # passed to a user's model only when it takes them, silently otherwise


def _typed_model_keys() -> set[str]:
    """The model.<key>=... overrides typed on this command line (none outside a dlrun command)."""
    import re

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {m.group(1) for o in HydraConfig.get().overrides.task if (m := re.match(r"\+*model\.(\w+)=", o))}
