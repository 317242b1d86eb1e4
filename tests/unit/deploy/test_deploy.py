"""dlrun.deploy (export, lowering, runtimes, parity) on tiny models: every format loads in its runtime,
runs at several batch sizes and
matches the source model; int8 programs really run inside XNNPACK; broken artifacts and unsupported
combinations fail loudly; a runtime that crashes in its verification child is a one-line failure."""

from __future__ import annotations

import copy
import importlib.util
import io
import os

import pytest
import torch
from torch import nn

from dlrun.config import capabilities
from dlrun.deploy import lower, runtime
from dlrun.deploy.parity import check_parity, verification_batch_sizes
from dlrun.deploy.program import export_program
from helpers import crash_hook

MAX_BATCH = 32
needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs dlrun[onnx]")


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


@pytest.fixture(scope="module")
def model() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _export(fmt: str, backend: str, module: nn.Module, example: torch.Tensor, path) -> lower.ExportResult:
    if fmt == "onnx":
        return lower.to_onnx(module, example, path, max_batch=MAX_BATCH)
    program = export_program(module, example, max_batch=MAX_BATCH)
    return lower.to_pte(program, path, backend=backend) if fmt == "pte" else lower.to_pt2(program, path)


@pytest.fixture(scope="module")
def fp32_artifact(model, inputs, tmp_path_factory):
    """Exports on demand, once per (format, backend): lowering costs seconds, whatever the model."""
    made: dict[tuple[str, str], lower.ExportResult] = {}

    def make(fmt: str, backend: str) -> lower.ExportResult:
        if (fmt, backend) not in made:
            path = tmp_path_factory.mktemp(f"{fmt}-{backend}") / f"model.{fmt}"
            made[fmt, backend] = _export(fmt, backend, model, inputs[:1], path)  # batch-1 example on purpose
        return made[fmt, backend]

    return make


@pytest.mark.parametrize(
    ("fmt", "backend"),
    [("pte", "xnnpack"), ("pte", "portable"), ("pt2", "none"), pytest.param("onnx", "onnxruntime", marks=needs_onnx)],
)
def test_fp32_artifact_runs_in_its_runtime_with_a_dynamic_batch(fmt, backend, model, inputs, fp32_artifact):
    capabilities.check_export_supported(fmt, backend, "fp32")
    result = fp32_artifact(fmt, backend)

    assert result.size_bytes == result.path.stat().st_size > 0
    assert list(result.path.parent.iterdir()) == [result.path]  # no temporary file left behind
    run = runtime.load_runner(result.path)
    for batch in (1, 7, MAX_BATCH):
        assert run(inputs[:batch]).shape == (batch, 10)
    targets = torch.randint(0, 10, (len(inputs),), generator=torch.Generator().manual_seed(3))
    parity = check_parity(model, run, inputs, targets, batch_sizes=(1, 16))
    assert parity.max_abs_diff < 1e-4 and parity.top1_agreement == 1.0
    assert parity.accuracy == pytest.approx((model(inputs).argmax(1) == targets).float().mean().item())
    assert parity.samples == len(inputs) and parity.batch_sizes == [1, 16]


def test_pte_delegation_counts(fp32_artifact):
    xnnpack, portable = fp32_artifact("pte", "xnnpack"), fp32_artifact("pte", "portable")

    assert xnnpack.delegation["aten_convolution_default"] == {"delegated": 1, "portable": 0}
    assert xnnpack.delegated_nodes > xnnpack.portable_nodes
    assert portable.delegated_nodes == 0 and portable.portable_nodes > 0
    assert fp32_artifact("pt2", "none").delegated_nodes is None


def test_pte_runner_rejects_a_batch_above_the_planned_maximum(model, inputs, tmp_path):
    path = tmp_path / "static.pte"
    program = export_program(model, inputs[:1], dynamic_batch=False)
    lower.to_pte(program, path, backend="portable")
    run = runtime.load_runner(path)

    assert run(inputs[:1]).shape == (1, 10)
    with pytest.raises(ValueError, match="batch 2 exceeds the 1 that static.pte was exported for"):
        run(inputs[:2])


def test_runtime_noise_is_filtered_from_stderr_and_the_rest_kept(capfd):
    # The runtime prints the cpuinfo lines once per process, so test the filter it goes through.
    with runtime.filtered_stderr(runtime.RUNTIME_NOISE):
        os.write(2, b"[cpuinfo_utils.cpp:87] Failed to open midr file /sys/devices/soc0/image_version\n")
        os.write(2, b"[method.cpp:822] Missing operator: aten::sort.values\n")
    err = capfd.readouterr().err
    assert "cpuinfo" not in err and "Missing operator: aten::sort.values" in err


@pytest.fixture(scope="module")
def int8_program(model, inputs) -> torch.fx.GraphModule:
    return _pt2e_int8(model, inputs)


def _pt2e_int8(model: nn.Module, calibration: torch.Tensor) -> torch.fx.GraphModule:
    """A PT2E int8 program as `dlrun quantize` makes one: quantized, saved, loaded back."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batch = torch.export.Dim("batch", min=1, max=64)
    example = (calibration[:2],)
    graph = torch.export.export(copy.deepcopy(model), example, dynamic_shapes=({0: batch},)).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph, quantizer)
    prepared(calibration)
    converted = convert_pt2e(prepared)
    saved = torch.export.export(converted, example, dynamic_shapes=({0: batch},))
    return torch.export.load(_roundtrip(saved)).module()


def _roundtrip(program: torch.export.ExportedProgram) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return buffer


def test_int8_pte_runs_its_quantized_ops_inside_xnnpack(int8_program, inputs, tmp_path):
    capabilities.check_export_supported("pte", "xnnpack", "pt2e_int8")
    path = tmp_path / "int8.pte"
    result = lower.to_pte(export_program(int8_program, inputs[:2], max_batch=MAX_BATCH), path, backend="xnnpack")

    quantize_ops = {op: counts for op, counts in result.delegation.items() if op.startswith("quantized_decomposed")}
    assert result.delegated_nodes > 0 and quantize_ops
    assert all(counts["delegated"] > 0 and counts["portable"] == 0 for counts in quantize_ops.values())
    assert result.delegation["aten_convolution_default"] == {"delegated": 1, "portable": 0}
    parity = check_parity(int8_program, runtime.load_runner(path), inputs, None, batch_sizes=(1, 16))
    assert parity.top1_agreement >= 0.97 and parity.relative_diff < 0.05


@pytest.mark.slow
@needs_onnx
def test_int8_onnx_runs_as_quantize_dequantize_in_onnxruntime(int8_program, inputs, tmp_path):
    path = tmp_path / "int8.onnx"
    lower.to_onnx(int8_program, inputs[:2], path, max_batch=MAX_BATCH)

    parity = check_parity(int8_program, runtime.load_runner(path), inputs, None, batch_sizes=(1, 16))
    assert parity.top1_agreement >= 0.97 and parity.relative_diff < 0.05


def test_parity_exposes_an_artifact_with_different_weights(model, inputs, tmp_path):
    tampered = copy.deepcopy(model)
    with torch.no_grad():
        tampered.fc.weight.copy_(torch.randn_like(tampered.fc.weight, generator=torch.Generator().manual_seed(2)))
    path = tmp_path / "tampered.pt2"
    lower.to_pt2(export_program(tampered, inputs[:2]), path)

    parity = check_parity(model, runtime.load_runner(path), inputs, None)
    assert parity.top1_agreement < 0.5 and parity.relative_diff > 0.5


def test_unsupported_combinations_are_refused_in_one_line():
    with pytest.raises(ValueError) as refused:
        capabilities.check_export_supported("pte", "xnnpack", "weight_only")
    message = str(refused.value)
    assert "\n" not in message and "silently wrong" in message
    assert "backend=xnnpack: fp32, pt2e_int8" in message and "backend=portable: fp32, weight_only" in message
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        capabilities.check_export_supported("tflite", "none", "fp32")
    with pytest.raises(ValueError, match="backend=coreml"):
        capabilities.check_export_supported("pte", "coreml", "fp32")
    for fmt, backend, kind in capabilities.EXPORT_CAPABILITIES:
        capabilities.check_export_supported(fmt, backend, kind)


def test_every_quantized_source_kind_is_known_and_at_least_exports_to_pt2():
    pt2e = {
        capabilities.quantized_source_kind(mode, backend)
        for mode in ("ptq", "qat", "dynamic")
        for backend in ("xnnpack", "x86_inductor")
    }
    weight_only = {
        capabilities.quantized_source_kind("weight_only", "torchao", dtype)
        for dtype in ("int8", "int4", "int8_dynamic")
    }
    assert pt2e | weight_only == set(capabilities.SOURCE_KINDS) - {"fp32"}
    assert capabilities.quantized_source_kind("qat", "xnnpack") == "pt2e_int8"
    assert all(("pt2", "none", kind) in capabilities.EXPORT_CAPABILITIES for kind in capabilities.SOURCE_KINDS)


class _Erfinv(nn.Module):  # not in the Core ATen opset: edge lowering rejects it
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erfinv(x.clamp(-0.5, 0.5))


class _Argsort(nn.Module):  # lowers, but the pip runtime has no aten::sort kernel
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.argsort(x, dim=1).float()


@pytest.mark.parametrize(("module", "op"), [(_Erfinv(), "aten.erfinv"), (_Argsort(), "aten::sort.values")])
def test_pte_lowering_failure_names_the_op_and_writes_nothing(module, op, tmp_path):
    program = export_program(module, torch.randn(2, 16), max_batch=4)
    with pytest.raises(ValueError, match="cannot lower to .pte") as failed:
        lower.to_pte(program, tmp_path / "model.pte", backend="portable")
    assert op in str(failed.value) and "\n" not in str(failed.value)
    assert list(tmp_path.iterdir()) == []


def test_onnx_without_its_packages_says_how_to_install(model, inputs, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"onnxscript: pip install 'dlrun\[onnx\]'"):
        lower.to_onnx(model, inputs[:2], tmp_path / "model.onnx")


def test_load_runner_rejects_unknown_suffixes(tmp_path):
    with pytest.raises(ValueError, match=r"expected a .pte, .pt2 or .onnx file"):
        runtime.load_runner(tmp_path / "model.tflite")


# --- verification in a child process, over the whole declared batch range (issue 14) -------------------------


def test_default_verification_batch_sizes_are_1_a_middle_one_and_max_batch_ascending():
    assert verification_batch_sizes(64) == [1, 32, 64]
    assert verification_batch_sizes(1024) == [1, 512, 1024]
    assert verification_batch_sizes(2) == [1, 2]


def test_parity_runs_a_batch_above_the_number_of_inputs_at_its_full_size(model, inputs):
    seen = []

    def runner(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return model(x)

    targets = torch.randint(0, 10, (len(inputs),), generator=torch.Generator().manual_seed(3))
    parity = check_parity(model, runner, inputs, targets, batch_sizes=verification_batch_sizes(64))

    assert seen == [1] * len(inputs) + [32, len(inputs) - 32] + [64]  # 40 inputs repeated to fill the batch of 64
    assert parity.samples == len(inputs) and parity.batch_sizes == [1, 32, 64] and parity.max_abs_diff == 0
    assert parity.accuracy == pytest.approx((model(inputs).argmax(1) == targets).float().mean().item())


@pytest.mark.parametrize("signal_name", ["SIGSEGV", "SIGABRT"])
def test_a_runtime_crash_in_the_child_is_a_one_line_error_not_a_dead_caller(
    signal_name, model, inputs, fp32_artifact, tmp_path, monkeypatch
):
    monkeypatch.setenv("PYTHONPATH", crash_hook(tmp_path / "hook", signal_name, at_batch=16))
    with pytest.raises(runtime.ArtifactRunError) as crashed:
        with runtime.isolated_runner(fp32_artifact("pt2", "none").path) as run:
            check_parity(model, run, inputs, None, batch_sizes=(1, 16))
    assert str(crashed.value) == f"the PyTorch runtime crashed ({signal_name}) at batch 16"


def test_the_child_runs_an_artifact_as_load_runner_does_and_reports_what_it_cannot_load(
    model, inputs, fp32_artifact, tmp_path
):
    batch_sizes = verification_batch_sizes(MAX_BATCH)
    with runtime.isolated_runner(fp32_artifact("pte", "xnnpack").path) as run:
        parity = check_parity(model, run, inputs, None, batch_sizes=batch_sizes)
    assert parity.max_abs_diff < 1e-4 and parity.batch_sizes == [1, 16, 32]

    garbage = tmp_path / "garbage.pte"
    garbage.write_bytes(b"not a program")
    with pytest.raises(runtime.ArtifactRunError, match=r"^the ExecuTorch runtime cannot load garbage.pte: ") as bad:
        with runtime.isolated_runner(garbage):
            pass
    assert "\n" not in str(bad.value)


class _GlobalPoolHead(nn.Module):
    """mobilenet_v2's tail, narrowed: a 1x1 conv widening to many channels, global average pooling, a classifier.

    With its int8 mean inside XNNPACK and a dynamic batch, batch 1 then a larger batch overran XNNPACK's
    accumulator workspace: SIGABRT here (256 channels), SIGSEGV or `free(): invalid next size` on mobilenet_v2."""

    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, channels, 1), nn.BatchNorm2d(channels), nn.ReLU6())
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def _calibrated(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """Put real statistics into BatchNorm (a freshly built model's are 0/1), then switch to eval."""
    with torch.no_grad():
        model.train()(inputs)
    return model.eval()


def test_int8_global_average_pool_pte_runs_at_batch_1_middle_and_max_in_a_child(tmp_path):
    torch.manual_seed(0)
    inputs = torch.randn(64, 3, 7, 5, generator=torch.Generator().manual_seed(1))  # odd sizes, as in the issue
    program = _pt2e_int8(_calibrated(_GlobalPoolHead(), inputs), inputs)
    path = tmp_path / "int8.pte"
    result = lower.to_pte(export_program(program, inputs[:32], max_batch=64), path, backend="xnnpack")

    with runtime.isolated_runner(path) as run:
        parity = check_parity(program, run, inputs, None, batch_sizes=verification_batch_sizes(64))
    assert parity.batch_sizes == [1, 32, 64] and parity.top1_agreement >= 0.97 and parity.relative_diff < 0.05
    # The cure keeps the mean inside XNNPACK (in fp32 between explicit converts): nothing moved to portable kernels.
    assert result.delegation["aten_mean_dim"] == {"delegated": 1, "portable": 0}
    assert all(c["portable"] == 0 for op, c in result.delegation.items() if op.startswith("quantized_decomposed"))


@pytest.mark.slow
def test_int8_mobilenet_v2_on_odd_inputs_runs_at_batch_1_middle_and_max_in_a_child(tmp_path):
    """Issue 14's case: `dlrun quantize mode=ptq` + `dlrun export format=pte` of mobilenet_v2 on [3, 7, 5]."""
    from dlrun.models import mobilenet_v2

    torch.manual_seed(0)
    inputs = torch.randn(64, 3, 7, 5, generator=torch.Generator().manual_seed(1))
    program = _pt2e_int8(_calibrated(mobilenet_v2([3, 7, 5], 10, width_mult=0.25), inputs), inputs)
    path = tmp_path / "mobilenet_v2.pte"
    lower.to_pte(export_program(program, inputs[:32], max_batch=64), path, backend="xnnpack")

    with runtime.isolated_runner(path) as run:
        parity = check_parity(program, run, inputs, None, batch_sizes=verification_batch_sizes(64))
    assert parity.batch_sizes == [1, 32, 64] and parity.top1_agreement >= 0.97 and parity.relative_diff < 0.05
