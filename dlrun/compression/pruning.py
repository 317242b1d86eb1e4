"""Pruning: structured (Torch-Pruning removes whole channels and neurons, so the network really shrinks) and
unstructured (torch.nn.utils.prune zeroes single weights: the dense model keeps its size and speed).

Structured pruning goes through Torch-Pruning's dependency graph, which removes a channel everywhere it is used:
the BatchNorm after a conv, the next layer's inputs, both sides of a residual add, its slice of a concatenation
(Inception), a depthwise conv's group. Channels are ranked by an importance criterion:

    magnitude   L1/L2 norm of each channel's weights, summed over its group
    taylor      |weight x gradient| (first-order estimate of the loss change), from a few training batches
    bn_scale    |gamma| of the BatchNorm that follows each conv (network slimming)

A pruned model is saved as a plain state_dict plus its layer widths (`structure`); `resize` makes a model freshly
built from its config that narrow again, so it loads with weights_only=True and no pickled code.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable

import torch
from torch import nn

from dlrun.core.errors import Unsupported, UsageError
from dlrun.core.profiling import count_flops

IMPORTANCES = ("magnitude", "taylor", "bn_scale")
SCOPES = ("global", "uniform")
# The attributes Torch-Pruning rewrites when it narrows a layer (forward reads some of them, e.g. a conv's groups).
WIDTH_ATTRS = (
    "in_channels",
    "out_channels",
    "groups",
    "in_features",
    "out_features",
    "num_features",
    "num_channels",
    "num_parameters",
    "embedding_dim",
)
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # the layers unstructured pruning zeroes weights in
FLOPS_SEARCH_STEPS = 10  # bisections of the channel ratio: its last step is 0.1% of the range

Score = Callable[[nn.Module], None]  # fills .grad of a model's parameters (Taylor importance)


def output_layer(model: nn.Module) -> str:
    """The name of the layer producing the outputs (the last Linear, else the last conv): pruning its outputs
    would remove classes, so it is never pruned."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = names or [name for name, m in model.named_modules() if isinstance(m, PRUNABLE)]
    if not names:
        raise UsageError(f"{type(model).__name__} has no Linear or conv layer to prune")
    return names[-1]


def ignored_layers(model: nn.Module, ignore: list[str]) -> list[str]:
    """The module names never pruned: `ignore` (each checked to exist) plus the output layer."""
    modules = [name for name, _ in model.named_modules() if name]
    for name in ignore:
        if name not in modules:
            near = difflib.get_close_matches(name, modules, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else f" (modules: {', '.join(modules[:8])}, ...)"
            raise UsageError(f"ignore: the model has no module '{name}'{hint}")
    head = output_layer(model)
    return [*ignore, head] if head not in ignore else list(ignore)


def step_fraction(total: float, step: int, steps: int) -> float:
    """The fraction of what is left after step-1 equal rounds that round `step` removes, so that `steps` rounds
    remove `total` of the original: rounds of 0.25 then 0.333 remove half in two steps."""
    before, after = total * (step - 1) / steps, total * step / steps
    return (after - before) / (1 - before)


def prune_structured(
    model: nn.Module,
    example: torch.Tensor,
    *,
    ratio: float,
    ignore: list[str],
    importance: str = "magnitude",
    p: int = 2,
    scope: str = "global",
    max_layer_ratio: float = 0.9,
    round_to: int | None = None,
    score: Score | None = None,
) -> nn.Module:
    """A copy of `model` with `ratio` of its prunable channels removed (the model itself is left as it was).

    `score` computes the gradients Taylor importance needs, on the copy about to be pruned."""
    pruned = copy.deepcopy(model).eval()
    if importance == "taylor":
        if score is None:
            raise Unsupported("taylor importance needs a `score` function that computes gradients")
        score(pruned)
    pruner = _pruner(
        pruned,
        example,
        ratio=ratio,
        ignore=ignore,
        importance=importance,
        p=p,
        scope=scope,
        max_layer_ratio=max_layer_ratio,
        round_to=round_to,
    )
    pruner.step()
    pruned.zero_grad(set_to_none=True)  # Taylor's gradients, now of the wrong shapes, must not reach an optimizer
    return pruned


def prune_to_flops(
    model: nn.Module, example: torch.Tensor, target_flops: int, *, max_layer_ratio: float = 0.9, **options
) -> nn.Module:
    """The least-pruned copy of `model` (options as prune_structured) with at most `target_flops` FLOPs, found by
    bisecting the channel ratio: Torch-Pruning targets channels, and FLOPs fall roughly with their square. Near
    max_layer_ratio Torch-Pruning skips layers it would empty, so FLOPs are not monotonic in the ratio: the search
    keeps the best copy it has seen rather than trusting the last one."""
    low, high = 0.0, max_layer_ratio
    best, best_flops, fewest = None, -1, count_flops(model, example)
    for _ in range(FLOPS_SEARCH_STEPS):
        middle = (low + high) / 2
        candidate = prune_structured(model, example, ratio=middle, max_layer_ratio=max_layer_ratio, **options)
        flops = count_flops(candidate, example)
        fewest = min(fewest, flops)
        if flops <= target_flops:
            high = middle
            if flops > best_flops:
                best, best_flops = candidate, flops
        else:
            low = middle
    if best is None:
        raise UsageError(
            f"cannot prune to {target_flops:,} FLOPs: the fewest reached is {fewest:,} (pruning at "
            f"most {max_layer_ratio:.0%} of each layer's channels); lower flops_ratio, raise "
            "pruner.max_layer_ratio or ignore fewer layers"
        )
    return best


def _pruner(
    model: nn.Module,
    example: torch.Tensor,
    *,
    ratio: float,
    ignore: list[str],
    importance: str,
    p: int,
    scope: str,
    max_layer_ratio: float,
    round_to: int | None,
):
    import torch_pruning as tp

    criteria = {
        "magnitude": lambda: tp.importance.MagnitudeImportance(p=p),
        "taylor": lambda: tp.importance.TaylorImportance(),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
    }
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=criteria[importance](),
            pruning_ratio=ratio,
            global_pruning=scope == "global",
            max_pruning_ratio=max_layer_ratio,
            round_to=round_to,
            ignored_layers=[model.get_submodule(name) for name in ignore],
        )
    except Exception as exc:  # tracing runs the model's own forward, which can fail in any way
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UsageError(f"Torch-Pruning cannot trace {type(model).__name__}: {reason}") from None
    groups = pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types)
    if not any(True for _ in groups):
        raise _nothing_to_prune(model, "every layer Torch-Pruning traced (on the autograd graph)", ignore)
    return pruner


def prune_unstructured(model: nn.Module, sparsity: float, ignore: list[str]) -> None:
    """Zero the `sparsity` fraction of smallest-magnitude weights over all prunable layers outside `ignore`, in
    place (global L1). The zeros stay zero while fine-tuning (torch.nn.utils.prune masks the weights) until
    `make_permanent`; after it, existing zeros rank lowest, so rounds with a growing sparsity are cumulative."""
    from torch.nn.utils import prune

    targets = [
        (m, "weight")
        for name, m in model.named_modules()
        if isinstance(m, PRUNABLE) and not any(name == i or name.startswith(i + ".") for i in ignore)
    ]
    if not targets:
        raise _nothing_to_prune(model, "every conv and Linear layer", ignore)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)


def _nothing_to_prune(model: nn.Module, layers: str, ignore: list[str]) -> UsageError:
    names = ", ".join(f"'{name}'" for name in ignore)
    return UsageError(f"nothing to prune in {type(model).__name__}: {layers} is ignored or the output layer ({names})")


def make_permanent(model: nn.Module) -> None:
    """Fold torch.nn.utils.prune's masks into the weights: a plain module again, zeros and all."""
    from torch.nn.utils import prune

    for module in model.modules():
        for name in [
            hook._tensor_name
            for hook in module._forward_pre_hooks.values()
            if isinstance(hook, prune.BasePruningMethod)
        ]:
            prune.remove(module, name)


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict a plain module of this architecture loads: a masked weight's `_orig` x `_mask` as itself."""
    state = model.state_dict()
    for name in [key.removesuffix("_orig") for key in state if key.endswith("_orig")]:
        if name + "_mask" in state:
            state[name] = state.pop(name + "_orig") * state.pop(name + "_mask")
    return state


def zeros_fraction(model: nn.Module) -> float:
    """The fraction of the model's parameters that are exactly zero (what unstructured pruning achieves)."""
    weights = dense_state_dict(model)
    tensors = [weights[name.removesuffix("_orig")] for name, _ in model.named_parameters()]
    return sum(int((t == 0).sum()) for t in tensors) / max(sum(t.numel() for t in tensors), 1)


def structure(model: nn.Module) -> dict[str, dict[str, int]]:
    """The width attributes of every layer that has them: {module name: {out_channels: 12, ...}}, plain ints."""
    found = {}
    for name, module in model.named_modules():
        widths = {attr: getattr(module, attr) for attr in WIDTH_ATTRS if type(getattr(module, attr, None)) is int}
        if widths:
            found[name] = widths
    return found


def resize(model: nn.Module, widths: dict, state: dict[str, torch.Tensor]) -> None:
    """Make a model built from its config as narrow as the pruned one `widths` (structure) and `state` (its
    state_dict) describe, in place, so that `model.load_state_dict(state)` fits. ValueError when they do not
    belong to this architecture."""
    try:
        for name, attrs in widths.items():
            module = model.get_submodule(name)
            for attr, value in attrs.items():
                if attr not in WIDTH_ATTRS or type(value) is not int:
                    raise Unsupported(f"structure of '{name}' holds {attr}={value!r}")
                setattr(module, attr, value)
        for key, tensor in state.items():
            owner_name, _, leaf = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            tensors = owner._parameters if leaf in owner._parameters else owner._buffers
            current = tensors.get(leaf)
            if current is None or current.shape == tensor.shape:
                continue
            # The values come with load_state_dict; only the shape (and kind: parameter or buffer) matters here.
            blank = torch.empty(tensor.shape, dtype=current.dtype, device=current.device)
            tensors[leaf] = nn.Parameter(blank, current.requires_grad) if isinstance(current, nn.Parameter) else blank
    except (AttributeError, TypeError) as exc:
        raise Unsupported(f"pruned structure does not fit {type(model).__name__}: {exc}") from None
