"""torchvision's ResNet-18 and MobileNetV2, adapted to small inputs, with ImageNet weights available offline.

Weights come from a local state_dict file (`model.weights_path`: what torchvision's download is, copied from a
machine with network), torchvision's cache ($TORCH_HOME/hub/checkpoints) or a download; without network and
file the error names both ways.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from dlrun.core.errors import DlrunError
from dlrun.models.zoo import image_shape

log = logging.getLogger("dlrun")
SMALL_IMAGE = 96  # below this size torchvision's ImageNet stems would downsample the image away


def _torchvision_weights(name: str, weights: str):
    """torchvision's weights enum entry for `weights`, or one line naming the choices."""
    import torchvision.models as tvm

    try:
        return tvm.get_model_weights(name).verify(weights)
    except (KeyError, ValueError, TypeError):
        raise DlrunError(f"unknown weights {weights!r} for {name}; try IMAGENET1K_V1 or null") from None


def _pretrained_state(name: str, weights: str, weights_path: str | None) -> tuple[dict, str]:
    """The pretrained state_dict and where it came from: the file `weights_path` (read with weights_only=True),
    else torchvision's cache or download, failing with one line (not a socket traceback) when offline."""
    import torch.hub

    from dlrun.core import checkpoint as ckpt

    if weights_path is not None:
        where = f"model.weights_path={weights_path}"
        return ckpt.state_dict_of(ckpt.load_file(Path(weights_path)), where), where
    resolved = _torchvision_weights(name, weights)
    try:
        return resolved.get_state_dict(progress=False, check_hash=True), f"torchvision's {name} {weights}"
    except OSError as exc:  # URLError is an OSError: no network and no cached file
        file = resolved.url.rsplit("/", 1)[-1]
        raise DlrunError(
            f"cannot download {name} weights (no network?): pass the file with model.weights_path=/path/{file} "
            f"or place it at {torch.hub.get_dir()}/checkpoints/{file}, or use model.weights=null ({exc})"
        ) from None


def _load_pretrained(model: nn.Module, name: str, weights: str | None, weights_path: str | None) -> None:
    """Load pretrained weights (model.weights_path, or model.weights from torchvision), if any. Layers whose shape
    this adaptation changed (the stem, a head for another class count) keep their fresh initialization, like
    init_from's; a file of another architecture or width is refused with the keys that differ."""
    if weights is None and weights_path is None:
        return
    from dlrun.core import checkpoint as ckpt

    state, where = _pretrained_state(name, weights or "IMAGENET1K_V1", weights_path)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    reinit = [k for k in own if k in state and k not in fitting]
    if state.keys() != own.keys():  # another architecture: refused, listing the missing/unexpected keys
        ckpt.load_weights(model, state, where, f"model={name}")
    model.load_state_dict(fitting, strict=False)
    reinitialized = f"; re-initialized {len(reinit)} whose shapes differ: {', '.join(reinit)}" if reinit else ""
    log.info(f"{name}: loaded {len(fitting)} of {len(own)} tensors from {where}{reinitialized}")


def resnet18(input_shape, num_outputs, weights: str | None = None, weights_path: str | None = None) -> nn.Module:
    import torchvision.models as tvm

    c, h, w = image_shape("resnet18", input_shape)
    model = tvm.resnet18(num_classes=num_outputs)
    if c != 3 or min(h, w) < SMALL_IMAGE:
        small = min(h, w) < SMALL_IMAGE
        model.conv1 = nn.Conv2d(c, 64, 3 if small else 7, 1 if small else 2, 1 if small else 3, bias=False)
        if small:
            model.maxpool = nn.Identity()
    _load_pretrained(model, "resnet18", weights, weights_path)
    return model


def mobilenet_v2(
    input_shape, num_outputs, width_mult: float = 1.0, weights: str | None = None, weights_path: str | None = None
) -> nn.Module:
    import torchvision.models as tvm

    c, h, w = image_shape("mobilenet_v2", input_shape)
    model = tvm.mobilenet_v2(num_classes=num_outputs, width_mult=width_mult)
    first = model.features[0][0]
    if c != 3 or min(h, w) < SMALL_IMAGE:
        stride = 1 if min(h, w) < SMALL_IMAGE else 2
        model.features[0][0] = nn.Conv2d(c, first.out_channels, 3, stride, 1, bias=False)
    _load_pretrained(model, "mobilenet_v2", weights, weights_path)
    return model
