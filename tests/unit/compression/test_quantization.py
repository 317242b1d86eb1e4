"""dlrun.compression.quantization on tiny models: real torchao PT2E / XNNPACK / x86-Inductor / quantize_ runs.

Tolerances were measured on these models and seeds (see each constant) with headroom of about 2x;
a quantizer that silently stops quantizing or breaks numerics moves them by orders of magnitude.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from dlrun.compression import quantization as q
from dlrun.config import capabilities
from dlrun.deploy.program import export_program, load_program, save_program

SHAPE = (1, 8, 8)


class TinyCNN(nn.Module):
    """Conv+BN+ReLU+MaxPool and a Linear head, like the project's LeNet."""

    def __init__(self, batch_norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if batch_norm else nn.Identity()
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


class ReusedReLU(nn.Module):
    """A residual block calling one ReLU module twice, as torchvision's ResNet does."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.relu(self.conv1(x))
        y = self.relu(self.conv2(y) + y)
        return self.fc(y.mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # a branch on a tensor value: not exportable


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(torch.flatten(x, 1)))


class WideMLP(nn.Module):
    """Weights (1 MiB in fp32) dominate the program, so the int8 saving shows."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 512)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(512, 512)
        self.fc = nn.Linear(512, 10)

    def forward(self, x):
        return self.fc(self.relu(self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))))


def make(model_class, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = model_class(**kwargs)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        with torch.no_grad():  # non-trivial running statistics, so folding BN is actually tested
            model.train()
            for _ in range(3):
                model(inputs(32, seed=9) * 2 + 0.5)
    return model.eval()


def inputs(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))


def calibration(count: int = 4) -> list[torch.Tensor]:
    return [inputs(32, seed=100 + i) for i in range(count)]


def assert_close_to_float(model: nn.Module, quantized, *, max_diff: float, min_top1: float) -> None:
    """Max abs logit difference on held-out data at batches 1, 7 and 64; top-1 agreement on the batch of 64."""
    with torch.no_grad():
        for batch in (1, 7, 64):
            x = inputs(batch, seed=batch)
            expected, got = model(x), quantized(x)
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() <= max_diff, f"batch {batch}"
        agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    assert agreement >= min_top1


def is_dequantize(node) -> bool:
    return "dequantize" in str(getattr(node, "target", ""))


def linear_nodes(graph_module: torch.fx.GraphModule) -> list:
    return [n for n in graph_module.graph.nodes if n.target == torch.ops.aten.linear.default]


# --- capability table ---------------------------------------------------------------------------------


def test_capability_table_is_consistent_with_modes_and_backends():
    for (mode, backend), note in capabilities.CAPABILITIES.items():
        assert mode in capabilities.MODES and backend in capabilities.BACKENDS and note and "\n" not in note
        capabilities.check_supported(mode, backend)
    assert {mode for mode, _ in capabilities.CAPABILITIES} == set(capabilities.MODES)
    assert capabilities.capability_rows() == [(m, b, n) for (m, b), n in capabilities.CAPABILITIES.items()]


@pytest.mark.parametrize(
    "mode, backend, hint",
    [
        ("weight_only", "xnnpack", "backend=torchao"),
        ("ptq", "torchao", "xnnpack or x86_inductor"),
        ("int3", "xnnpack", "ptq, dynamic, qat, weight_only"),
        ("ptq", "tensorrt", "xnnpack, x86_inductor, torchao"),
    ],
)
def test_check_supported_names_what_is_supported_in_one_line(mode, backend, hint):
    with pytest.raises(ValueError) as error:
        capabilities.check_supported(mode, backend)
    assert hint in str(error.value) and "\n" not in str(error.value)


def test_quantizer_entry_points_validate_the_combination():
    with pytest.raises(ValueError, match="backend=torchao"):
        q.quantize_dynamic(make(TinyCNN), inputs(1, 0), backend="torchao")
    with pytest.raises(ValueError, match="per channel only"):
        q.make_quantizer("x86_inductor", per_channel=False)


# --- export -------------------------------------------------------------------------------------------


def test_export_from_a_batch_1_example_keeps_the_batch_dynamic():
    model = make(TinyCNN)
    graph = export_program(model, inputs(1, 0), max_batch=64).module()  # the path PT2E quantization exports with
    for batch in (1, 7, 64):
        x = inputs(batch, seed=batch)
        torch.testing.assert_close(graph(x), model(x))


@pytest.mark.parametrize("strict", [False, True])
def test_non_exportable_model_raises_one_line_naming_the_module(strict):
    with pytest.raises(ValueError) as error:
        export_program(GatedNet(), inputs(1, 0), strict=strict)
    message = str(error.value)
    assert "\n" not in message and "GatedNet" in message
    assert "Gate.forward" in message and "'gate'" in message


# --- PT2E modes ---------------------------------------------------------------------------------------


def test_ptq_xnnpack_is_close_to_float_and_really_int8():
    model = make(TinyCNN)
    quantized = q.quantize_ptq(model, inputs(1, 0), calibration(), backend="xnnpack")
    # measured (logits up to 2.0): max diff 0.009 / 0.011 / 0.056 at batch 1 / 7 / 64, top-1 agreement 0.98
    assert_close_to_float(model, quantized, max_diff=0.12, min_top1=0.9)
    int8_constants = [t for t in quantized.state_dict().values() if t.dtype == torch.int8]
    assert len(int8_constants) == 2  # conv and fc weights
    assert not any(n.target == torch.ops.aten.batch_norm.default for n in quantized.graph.nodes)


def test_ptq_without_calibration_batches_is_an_error():
    with pytest.raises(ValueError, match="calibration"):
        q.quantize_ptq(make(TinyCNN), inputs(1, 0), iter([]), backend="xnnpack")


def test_ptq_x86_inductor_handles_a_reused_relu_module():
    # Non-strict export + X86InductorQuantizer fails on this model; the module exports strictly for x86.
    model = make(ReusedReLU)
    quantized = q.quantize_ptq(model, inputs(1, 0), calibration(), backend="x86_inductor")
    # measured (logits up to 0.63): max diff 0.0056, top-1 agreement 1.0
    assert_close_to_float(model, quantized, max_diff=0.015, min_top1=0.9)


def test_dynamic_xnnpack_is_close_to_float():
    model = make(TinyCNN)
    quantized = q.quantize_dynamic(model, inputs(1, 0), backend="xnnpack")
    # measured: max diff 0.0075, top-1 agreement 0.98 (only the Linear is quantized: XNNPACK's dynamic
    # patterns skip a conv followed by ReLU)
    assert_close_to_float(model, quantized, max_diff=0.02, min_top1=0.9)
    (fc,) = linear_nodes(quantized)
    assert is_dequantize(fc.args[0]) and is_dequantize(fc.args[1])


@pytest.mark.parametrize("backend", ["xnnpack", "x86_inductor"])
def test_excluded_module_stays_float(backend):
    model = make(TinyCNN)
    quantized = q.quantize_ptq(model, inputs(1, 0), calibration(1), backend=backend, exclude=["fc"])
    (fc,) = linear_nodes(quantized)
    assert fc.args[1].op == "get_attr" and quantized.get_parameter(fc.args[1].target).dtype == torch.float32
    assert not any("quantize" in str(user.target) for user in fc.users)  # its output is not quantized
    conv = next(n for n in quantized.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    assert is_dequantize(conv.args[1])  # the rest still is


def test_exclude_with_an_unknown_module_name_is_an_error():
    with pytest.raises(ValueError, match="'head'"):
        q.quantize_ptq(make(TinyCNN), inputs(1, 0), calibration(1), backend="xnnpack", exclude=["head"])


def train_a_little(prepared, model, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3)
    for step in range(steps):
        x = inputs(16, seed=200 + step)
        loss = (prepared(x) - model(x)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_qat_xnnpack_is_close_to_float():
    # Without BatchNorm: converting conv+BN QAT costs 20-40 s here (torchao exports ~100 pattern graphs); the
    # slow test covers it. prepare alone still takes ~4 s (XNNPACK's QAT annotators export their patterns).
    model = make(TinyCNN, batch_norm=False)
    prepared = q.prepare_qat(model, inputs(1, 0), backend="xnnpack")
    train_a_little(prepared, model)
    quantized = q.convert_qat(prepared)
    # measured (logits up to 2.0): max diff 0.013 / 0.017 / 0.24 at batch 1 / 7 / 64 (one sample outside the
    # ranges observed in 3 training steps), top-1 agreement 0.97
    assert_close_to_float(model, quantized, max_diff=0.5, min_top1=0.9)
    (fc,) = linear_nodes(quantized)
    assert is_dequantize(fc.args[0]) and is_dequantize(fc.args[1])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["xnnpack", "x86_inductor"])
def test_qat_phases_freeze_observers_and_batch_norm_then_fold_it(backend):
    model = make(TinyCNN)
    prepared = q.prepare_qat(model, inputs(1, 0), backend=backend, exclude=["fc"])
    running_mean = prepared.get_buffer("bn.running_mean")
    scales = [m.scale for m in prepared.modules() if hasattr(m, "observer_enabled")]

    def one_step_changes() -> tuple[bool, bool]:
        before = running_mean.clone(), [s.clone() for s in scales]
        train_a_little(prepared, model, steps=1)
        return not torch.equal(before[0], running_mean), any(not torch.equal(a, b) for a, b in zip(before[1], scales))

    assert one_step_changes() == (True, True)
    q.set_qat_phase(prepared, observers=False, bn_stats=False)
    assert one_step_changes() == (False, False)
    q.set_qat_mode(prepared, False)
    q.set_qat_mode(prepared, True)  # the BN freeze survives the eval/train switch of a training loop
    assert one_step_changes() == (False, False)
    q.set_qat_phase(prepared, observers=True, bn_stats=True)
    assert one_step_changes() == (True, True)

    quantized = q.convert_qat(prepared)
    assert not any("batch_norm" in str(n.target) for n in quantized.graph.nodes)
    (fc,) = linear_nodes(quantized)
    assert fc.args[1].op == "get_attr"
    # measured (logits up to 2.0): max diff 0.21 on both backends, top-1 agreement 0.97; most of the difference
    # is the BN statistics moving towards the training inputs during the steps above
    assert_close_to_float(model, quantized, max_diff=0.5, min_top1=0.9)


# --- weight-only --------------------------------------------------------------------------------------


def test_weight_only_int8_is_close_to_float_and_leaves_the_original_alone():
    model = make(TinyCNN)
    quantized = q.quantize_weight_only(model, dtype="int8")
    # measured (logits up to 2.0): max diff 0.0051, top-1 agreement 0.97
    assert_close_to_float(model, quantized, max_diff=0.012, min_top1=0.9)
    assert type(quantized.fc.weight).__name__ == "Int8Tensor"
    assert type(model.fc.weight) is nn.Parameter and model.fc.weight.dtype == torch.float32


def test_weight_only_exclude_and_dtypes():
    model = make(WideMLP)
    quantized = q.quantize_weight_only(model, dtype="int4", group_size=32, exclude=["fc"])
    assert type(quantized.fc2.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(quantized.fc.weight) is nn.Parameter
    dynamic = q.quantize_weight_only(model, dtype="int8_dynamic")
    # measured (logits up to 0.27): max diff 0.0047, top-1 agreement 1.0
    assert_close_to_float(model, dynamic, max_diff=0.01, min_top1=0.9)


def test_weight_only_rejects_bad_dtype_and_group_size():
    with pytest.raises(ValueError, match="int8, int4, int8_dynamic"):
        q.quantize_weight_only(make(TinyCNN), dtype="fp8")
    with pytest.raises(ValueError, match="group_size=48 does not divide in_features=128 of layer 'fc'"):
        q.quantize_weight_only(make(TinyCNN), dtype="int4", group_size=48)


# --- programs on disk ---------------------------------------------------------------------------------


def test_saved_ptq_program_round_trips_and_is_smaller_than_float(tmp_path):
    model = make(WideMLP)
    quantized = q.quantize_ptq(model, inputs(1, 0), calibration(1), backend="xnnpack")
    float_path, int8_path = tmp_path / "fp32.pt2", tmp_path / "runs" / "int8.pt2"
    save_program(model, inputs(1, 0), float_path)
    save_program(quantized, inputs(1, 0), int8_path)
    assert sorted(p.name for p in int8_path.parent.iterdir()) == ["int8.pt2"]  # no .tmp left behind
    loaded = load_program(int8_path)
    for batch in (1, 7, 64):
        x = inputs(batch, seed=batch)
        torch.testing.assert_close(loaded(x), quantized(x), rtol=0, atol=0)
    # measured: programs 1.22 MB vs 0.36 MB (3.4x), state_dicts 1.21 MB vs 0.32 MB (3.8x); before convert's
    # leftover float weights were dropped the int8 program was larger than the float one
    assert float_path.stat().st_size > 3 * int8_path.stat().st_size
    assert state_dict_bytes(model) > 3 * state_dict_bytes(quantized)


def test_saved_weight_only_program_round_trips(tmp_path):
    model = make(WideMLP)
    quantized = q.quantize_weight_only(model, dtype="int8")
    save_program(quantized, inputs(1, 0), tmp_path / "w8.pt2")
    loaded = load_program(tmp_path / "w8.pt2")
    x = inputs(7, seed=7)
    torch.testing.assert_close(loaded(x), quantized(x), rtol=0, atol=0)


def test_load_program_rejects_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match="no saved program"):
        load_program(tmp_path / "missing.pt2")
    (tmp_path / "bad.pt2").write_bytes(b"not a program")
    with pytest.raises(ValueError, match="cannot load program") as error:
        load_program(tmp_path / "bad.pt2")
    assert "\n" not in str(error.value)


def state_dict_bytes(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
