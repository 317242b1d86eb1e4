"""Fine-tuning a pretrained model: freeze parts of it (`trainer.freeze`) and train the head faster than the backbone
(`trainer.head`, `trainer.backbone_lr_ratio`), the notes' "freeze the backbone, train the head, then unfreeze":

    dlrun train init_from=BASE_RUN dataset=... trainer.freeze=[features]               # phase 1: the head only
    dlrun train init_from=PHASE1_RUN trainer.head=[head] trainer.backbone_lr_ratio=0.1  # phase 2: all, backbone slower

Parts are named by module-name prefixes: `features` covers features.0.0.weight, features.2.1.running_mean...
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from dlrun.core.errors import UsageError
from dlrun.training.loop import SetMode


def covers(prefix: str, name: str) -> bool:
    """Whether the module-name prefix `prefix` names `name` or one of its parents (`head` covers `head.4`)."""
    return name == prefix or name.startswith(prefix + ".")


def check_prefixes(model: nn.Module, prefixes: Sequence[str], setting: str) -> None:
    """Every prefix must name a module of `model`; the error lists the top-level ones to choose from."""
    names = [name for name, _ in model.named_modules() if name]
    unknown = [p for p in prefixes if not any(covers(p, name) for name in names)]
    if unknown:
        top = ", ".join(name for name, _ in model.named_children())
        raise UsageError(
            f"{setting}: no module named {', '.join(map(repr, unknown))} in {type(model).__name__}; "
            f"its top-level modules: {top}"
        )


def freeze(model: nn.Module, prefixes: Sequence[str], setting: str = "trainer.freeze") -> None:
    """Stop the parameters under `prefixes` from training (their BatchNorm statistics: see frozen_norms)."""
    check_prefixes(model, prefixes, setting)
    for name, parameter in model.named_parameters():
        if any(covers(p, name) for p in prefixes):
            parameter.requires_grad_(False)


def frozen_norms(model: nn.Module) -> list[nn.Module]:
    """Normalization layers none of whose parameters train (frozen by trainer.freeze, or by LoRA): their running
    statistics must stay frozen too, or the frozen part would still change with the new data."""
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._NormBase)
        and any(True for _ in module.parameters())
        and not any(p.requires_grad for p in module.parameters())
    ]


def frozen_norm_mode(frozen: Sequence[nn.Module]) -> SetMode:
    """The loop's train/eval switch that puts frozen normalization layers back into eval mode after every
    `model.train()`: the loop switches the whole model to train mode each epoch."""

    def set_mode(model: nn.Module, training: bool) -> None:
        model.train(training)
        for module in frozen:
            module.eval()

    return set_mode


def param_groups(model: nn.Module, head: Sequence[str], backbone_lr_ratio: float) -> list[dict]:
    """The trainable parameters as optimizer groups: those under `head` at the optimizer's lr (first: its lr is
    the one logged), every other trainable one at lr * backbone_lr_ratio. Frozen parameters are left out."""
    if backbone_lr_ratio != 1.0 and not head:
        raise UsageError(
            "trainer.backbone_lr_ratio needs trainer.head: the module prefixes that train at the full lr, e.g. [head]"
        )
    check_prefixes(model, head, "trainer.head")
    heads, backbone = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (heads if any(covers(p, name) for p in head) else backbone).append(parameter)
    if not heads and not backbone:
        raise UsageError("nothing left to train: trainer.freeze covers every parameter of the model")
    groups = [{"params": heads, "lr_ratio": 1.0}, {"params": backbone, "lr_ratio": backbone_lr_ratio}]
    return [group for group in groups if group["params"]]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
