"""`adapter=lora`: fine-tune low-rank adapters (PEFT's LoRA) beside frozen weights, plus modules that train in full
(`adapter.train`, a new head). Checkpoints hold the adapters merged into plain weights under MODEL, so eval,
quantize and export read a LoRA run like any other; last.pt also keeps the adapter model's own state (ADAPTER)
for a resume.

PEFT pulls in transformers (importing it takes ~5 s): it is imported only by `wrap`, i.e. only by runs with
adapter=lora; `is_adapted` asks without importing it.
"""

from __future__ import annotations

import copy
import sys

from torch import nn

from dlrun.core.errors import UsageError
from dlrun.training.transfer import check_prefixes, covers

INSTALL = "pip install 'peft>=0.21' (or pip install 'dlrun[lora]')"


def _import_peft():
    try:
        import peft
    except ImportError:
        raise UsageError(f"adapter=lora needs PEFT, which is not installed: {INSTALL}") from None
    return peft


def is_adapted(model: nn.Module) -> bool:
    peft = sys.modules.get("peft")  # not imported: no model can be a PEFT model
    return peft is not None and isinstance(model, peft.PeftModel)


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers LoRA adapts here: Linear and ungrouped Conv2d (PEFT has no LoRA for depthwise convolutions)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)
    }


def wrap(model: nn.Module, adapter) -> nn.Module:
    """The PEFT model that trains adapters of rank adapter.r on adapter.target (default: every adaptable layer
    outside adapter.train) and adapter.train in full; every other parameter is frozen. Wraps `model` in place."""
    trained = list(adapter.train or [])
    check_prefixes(model, trained, "adapter.train")
    layers = adaptable_layers(model)
    if adapter.target is None:
        targets = [name for name in layers if not any(covers(p, name) for p in trained)]
    else:
        targets = list(adapter.target)
        for target in targets:
            matched = [name for name in layers if name == target or name.endswith("." + target)]
            if not matched:
                names = list(layers)
                listed = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise UsageError(f"adapter.target: no Linear/Conv2d layer named {target!r}; the layers: {listed}")
            if any(covers(p, name) for p in trained for name in matched):
                raise UsageError(f"adapter.target {target!r} is inside adapter.train, which trains in full already")
    if not targets:
        raise UsageError("adapter=lora: no Linear/Conv2d layer outside adapter.train to adapt; set adapter.target")
    peft = _import_peft()
    config = peft.LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
        modules_to_save=trained or None,
    )
    return peft.get_peft_model(model, config)


def plain_state_dict(model: nn.Module) -> dict:
    """The weights later commands load: a PEFT model's merged into a copy of its plain model, else as they are."""
    if is_adapted(model):
        return copy.deepcopy(model).merge_and_unload().state_dict()
    return model.state_dict()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model, the adapters merged into its layers (a PEFT model wraps it in place), for test metrics,
    FLOPs and later commands; any other model as it is."""
    return model.merge_and_unload() if is_adapted(model) else model
