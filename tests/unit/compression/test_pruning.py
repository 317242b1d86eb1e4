"""dlrun.compression.pruning on the zoo's models at tiny widths: real Torch-Pruning and torch.nn.utils.prune runs.

Every structured case checks that the network really shrank (params and FLOPs), still answers with finite outputs of
the right shape, and reloads from a weights_only checkpoint through sources.load_model, the path eval, quantize,
export and bench take.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dlrun.compression import pruning
from dlrun.core import checkpoint as ckpt
from dlrun.core import profiling, sources
from dlrun.core.errors import UsageError
from dlrun.models import build

SHAPE = (1, 8, 8)  # sklearn digits
ZOO = {  # tiny widths: each model builds and prunes in well under a second
    "lenet": {"_target_": "dlrun.models.LeNet", "channels": [8, 16], "hidden": 32},
    "resnet": {"_target_": "dlrun.models.ResNet", "widths": [8, 16, 32]},  # residual adds
    "googlenet": {"_target_": "dlrun.models.GoogLeNet", "width": 8},  # concatenated Inception branches
    "mobilenet_v2": {"_target_": "dlrun.models.mobilenet_v2", "width_mult": 0.25},  # depthwise convs, residuals
}


def model_config(name: str) -> dict:
    return {
        "_target_": ZOO[name]["_target_"],
        "input_shape": list(SHAPE),
        "num_outputs": 10,
        **{k: v for k, v in ZOO[name].items() if k != "_target_"},
    }


def zoo_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build(OmegaConf.create(model_config(name))).eval()


def inputs(batch: int = 8) -> torch.Tensor:
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(1))


def taylor_score(model: nn.Module) -> None:
    """Gradients of a classification loss on random labels: enough for Taylor importance to rank channels."""
    model.zero_grad()
    labels = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
    nn.functional.cross_entropy(model(inputs()), labels).backward()


def reloaded(pruned: nn.Module, name: str, tmp_path) -> nn.Module:
    """The pruned model written as a prune run writes it and read back through sources.load_model."""
    path = tmp_path / "best.pt"
    ckpt.save(
        path,
        {
            ckpt.MODEL: pruned.state_dict(),
            ckpt.STRUCTURE: pruning.structure(pruned),
            ckpt.CONFIG: {"model": model_config(name)},
        },
    )
    return sources.load_model(sources.Source("checkpoint", path, {"model": model_config(name)}, None, None))


@pytest.mark.parametrize("name", list(ZOO))
def test_structured_pruning_shrinks_every_zoo_model_and_reloads_without_pickled_code(name, tmp_path):
    model, x = zoo_model(name), inputs()
    head = pruning.output_layer(model)
    pruned = pruning.prune_structured(model, x[:2], ratio=0.5, ignore=pruning.ignored_layers(model, []))

    assert profiling.count_params(pruned) < 0.6 * profiling.count_params(model)
    assert profiling.count_flops(pruned, x) < 0.6 * profiling.count_flops(model, x)
    assert profiling.tensor_bytes(pruned) < profiling.tensor_bytes(model)
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    assert pruned.get_submodule(head).out_features == 10  # the classes are never pruned
    assert profiling.count_params(model) == profiling.count_params(zoo_model(name))  # the source is left as it was

    fresh = reloaded(pruned, name, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)
    assert pruning.structure(fresh) == pruning.structure(pruned)


@pytest.mark.parametrize("importance", pruning.IMPORTANCES)
@pytest.mark.parametrize("scope", pruning.SCOPES)
def test_every_importance_criterion_and_scope_prunes(importance, scope):
    model, x = zoo_model("resnet"), inputs()
    # Fresh BatchNorm scales are all 1, so BN-scale importance could not tell channels apart: give them a spread.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.1, 1.0)
    pruned = pruning.prune_structured(
        model, x[:2], ratio=0.5, ignore=["fc"], importance=importance, scope=scope, score=taylor_score
    )
    assert profiling.count_flops(pruned, x) < 0.7 * profiling.count_flops(model, x)
    assert all(p.grad is None for p in pruned.parameters())  # Taylor's gradients do not leak into fine-tuning


def test_uniform_scope_removes_the_same_fraction_from_every_layer():
    model = zoo_model("lenet")
    pruned = pruning.prune_structured(model, inputs(2), ratio=0.5, ignore=["head.4"], scope="uniform")
    widths = pruning.structure(pruned)
    assert widths["features.0.0"]["out_channels"] == 4 and widths["features.2.0"]["out_channels"] == 8
    assert widths["head.1"]["out_features"] == 16 and widths["head.4"]["out_features"] == 10


def test_rounds_remove_equal_shares_of_the_target():
    kept = 1.0
    for step in (1, 2, 3):
        kept *= 1 - pruning.step_fraction(0.6, step, 3)
        assert kept == pytest.approx(1 - 0.6 * step / 3)


def test_flops_target_is_met_without_overshooting_much():
    model, x = zoo_model("googlenet"), inputs()
    flops = profiling.count_flops(model, x)
    pruned = pruning.prune_to_flops(model, x[:2], flops // 2, ignore=["head.2"])
    assert 0.35 * flops < profiling.count_flops(pruned, x) <= flops // 2


def test_unreachable_flops_target_is_one_line():
    model = zoo_model("lenet")
    with pytest.raises(UsageError, match="cannot prune to 10 FLOPs"):
        pruning.prune_to_flops(model, inputs(2), 10, ignore=["head.4"])


def test_unstructured_pruning_zeroes_weights_but_keeps_size_and_flops(tmp_path):
    model, x = zoo_model("lenet"), inputs()
    params, flops = profiling.count_params(model), profiling.count_flops(model, x)
    zeros_before = pruning.zeros_fraction(model)  # fresh BatchNorm biases are zero
    pruning.prune_unstructured(model, 0.5, ["head.4"])
    masked_state = pruning.dense_state_dict(model)  # what a checkpoint saved mid-fine-tuning holds
    pruning.make_permanent(model)

    assert profiling.count_params(model) == params and profiling.count_flops(model, x) == flops
    assert masked_state.keys() == model.state_dict().keys()
    prunable = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, pruning.PRUNABLE) and n != "head.4"
    )
    assert pruning.zeros_fraction(model) == pytest.approx(zeros_before + 0.5 * prunable / params, abs=1e-3)
    assert int((model.get_submodule("head.4").weight == 0).sum()) == 0  # the output layer is never pruned
    assert pruning.structure(reloaded(model, "lenet", tmp_path)) == pruning.structure(zoo_model("lenet"))


def test_ignored_layers_adds_the_output_layer_and_names_the_closest_module():
    model = zoo_model("resnet")
    assert pruning.ignored_layers(model, []) == ["fc"]
    assert pruning.ignored_layers(model, ["features.0"]) == ["features.0", "fc"]
    assert (
        pruning.prune_structured(model, inputs(2), ratio=0.5, ignore=["features.0", "fc"])
        .get_submodule("features.0.0")
        .out_channels
        == 8
    )  # an ignored block keeps its width
    with pytest.raises(UsageError, match=r"no module 'featurs\.0'; did you mean features\.0"):
        pruning.ignored_layers(model, ["featurs.0"])


class NoGradConv(nn.Module):
    """Its conv runs outside autograd, so Torch-Pruning's trace cannot see it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        with torch.no_grad():
            y = self.conv(x)
        return self.fc(y.mean((2, 3)))


class ListOutput(NoGradConv):
    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3))).tolist()  # not a tensor: tracing fails


def test_models_torch_pruning_cannot_trace_are_refused_in_one_line():
    with pytest.raises(UsageError, match="nothing to prune in NoGradConv"):
        pruning.prune_structured(NoGradConv(), inputs(2), ratio=0.5, ignore=["fc"])
    with pytest.raises(UsageError, match="Torch-Pruning cannot trace ListOutput"):
        pruning.prune_structured(ListOutput(), inputs(2), ratio=0.5, ignore=["fc"])


def test_a_structure_from_another_architecture_is_refused():
    state = zoo_model("lenet").state_dict()
    with pytest.raises(ValueError, match="does not fit LeNet"):
        pruning.resize(zoo_model("lenet"), {"no.such.layer": {"out_channels": 4}}, state)
    with pytest.raises(ValueError, match="holds out_channels='4'"):
        pruning.resize(zoo_model("lenet"), {"features.0.0": {"out_channels": "4"}}, state)
