"""torchvision's ResNet-18 and MobileNetV2, adapted to small inputs, with ImageNet weights available offline.

Weights come from torchvision's cache ($TORCH_HOME/hub/checkpoints) or a download; without network and
cache the error says where to place the file.
"""

from __future__ import annotations

from torch import nn

from dlrun.core.errors import DlrunError
from dlrun.models.zoo import image_shape

SMALL_IMAGE = 96  # below this size torchvision's ImageNet stems would downsample the image away


def _torchvision_weights(builder, weights: str | None, name: str):
    """torchvision weights enum, failing with one line (not a socket traceback) when they cannot be had offline."""
    if weights is None:
        return None
    import torchvision.models as tvm

    try:
        return tvm.get_model_weights(builder).verify(weights)
    except (KeyError, ValueError, TypeError):
        raise DlrunError(f"unknown weights {weights!r} for {name}; try IMAGENET1K_V1 or null") from None


def _load_pretrained(model: nn.Module, weights, name: str) -> None:
    """Load ImageNet weights, skipping layers whose shape this adaptation changed (stem, head)."""
    import torch.hub

    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except OSError as exc:  # URLError is an OSError: no network and no cached file
        cache = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
        raise DlrunError(
            f"cannot download {name} weights (no network?): place {cache} there or use model.weights=null ({exc})"
        ) from None
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)


def resnet18(input_shape, num_outputs, weights: str | None = None) -> nn.Module:
    import torchvision.models as tvm

    c, h, w = image_shape("resnet18", input_shape)
    model = tvm.resnet18(num_classes=num_outputs)
    if c != 3 or min(h, w) < SMALL_IMAGE:
        small = min(h, w) < SMALL_IMAGE
        model.conv1 = nn.Conv2d(c, 64, 3 if small else 7, 1 if small else 2, 1 if small else 3, bias=False)
        if small:
            model.maxpool = nn.Identity()
    if (resolved := _torchvision_weights("resnet18", weights, "resnet18")) is not None:
        _load_pretrained(model, resolved, "resnet18")
    return model


def mobilenet_v2(input_shape, num_outputs, width_mult: float = 1.0, weights: str | None = None) -> nn.Module:
    import torchvision.models as tvm

    c, h, w = image_shape("mobilenet_v2", input_shape)
    model = tvm.mobilenet_v2(num_classes=num_outputs, width_mult=width_mult)
    first = model.features[0][0]
    if c != 3 or min(h, w) < SMALL_IMAGE:
        stride = 1 if min(h, w) < SMALL_IMAGE else 2
        model.features[0][0] = nn.Conv2d(c, first.out_channels, 3, stride, 1, bias=False)
    if (resolved := _torchvision_weights("mobilenet_v2", weights, "mobilenet_v2")) is not None:
        _load_pretrained(model, resolved, "mobilenet_v2")
    return model
