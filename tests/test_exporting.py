"""dlrun.exporting on tiny models: every format loads in its runtime, runs at several batch sizes and
matches the source model; int8 programs really run inside XNNPACK; broken artifacts and unsupported
combinations fail loudly."""

from __future__ import annotations

import copy
import importlib.util
import io
import os

import pytest
import torch
from torch import nn

from dlrun import exporting

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


def _export(fmt: str, backend: str, module: nn.Module, example: torch.Tensor, path) -> exporting.ExportResult:
    if fmt == "onnx":
        return exporting.to_onnx(module, example, path, max_batch=MAX_BATCH)
    program = exporting.export_program(module, example, max_batch=MAX_BATCH)
    return exporting.to_pte(program, path, backend=backend) if fmt == "pte" else exporting.to_pt2(program, path)


@pytest.fixture(scope="module")
def fp32_artifact(model, inputs, tmp_path_factory):
    """Exports on demand, once per (format, backend): lowering costs seconds, whatever the model."""
    made: dict[tuple[str, str], exporting.ExportResult] = {}

    def make(fmt: str, backend: str) -> exporting.ExportResult:
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
    exporting.check_export_supported(fmt, backend, "fp32")
    result = fp32_artifact(fmt, backend)

    assert result.size_bytes == result.path.stat().st_size > 0
    assert list(result.path.parent.iterdir()) == [result.path]  # no temporary file left behind
    run = exporting.load_runner(result.path)
    for batch in (1, 7, MAX_BATCH):
        assert run(inputs[:batch]).shape == (batch, 10)
    targets = torch.randint(0, 10, (len(inputs),), generator=torch.Generator().manual_seed(3))
    parity = exporting.check_parity(model, run, inputs, targets, batch_sizes=(1, 16))
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
    program = exporting.export_program(model, inputs[:1], dynamic_batch=False)
    exporting.to_pte(program, path, backend="portable")
    run = exporting.load_runner(path)

    assert run(inputs[:1]).shape == (1, 10)
    with pytest.raises(ValueError, match="batch 2 exceeds the 1 that static.pte was exported for"):
        run(inputs[:2])


def test_runtime_noise_is_filtered_from_stderr_and_the_rest_kept(capfd):
    # The runtime prints the cpuinfo lines once per process, so test the filter it goes through.
    with exporting._filtered_stderr(exporting._RUNTIME_NOISE):
        os.write(2, b"[cpuinfo_utils.cpp:87] Failed to open midr file /sys/devices/soc0/image_version\n")
        os.write(2, b"[method.cpp:822] Missing operator: aten::sort.values\n")
    err = capfd.readouterr().err
    assert "cpuinfo" not in err and "Missing operator: aten::sort.values" in err


@pytest.fixture(scope="module")
def int8_program(model, inputs) -> torch.fx.GraphModule:
    """A PT2E int8 program as `dlrun quantize` makes one: quantized, saved, loaded back."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batch = torch.export.Dim("batch", min=1, max=64)
    graph = torch.export.export(copy.deepcopy(model), (inputs[:2],), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(graph, XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)))
    prepared(inputs)  # calibration
    converted = convert_pt2e(prepared)
    saved = torch.export.export(converted, (inputs[:2],), dynamic_shapes=({0: batch},))
    return torch.export.load(_roundtrip(saved)).module()


def _roundtrip(program: torch.export.ExportedProgram) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return buffer


def test_int8_pte_runs_its_quantized_ops_inside_xnnpack(int8_program, inputs, tmp_path):
    exporting.check_export_supported("pte", "xnnpack", "pt2e_int8")
    path = tmp_path / "int8.pte"
    result = exporting.to_pte(exporting.export_program(int8_program, inputs[:2], max_batch=MAX_BATCH), path, backend="xnnpack")

    quantize_ops = {op: counts for op, counts in result.delegation.items() if op.startswith("quantized_decomposed")}
    assert result.delegated_nodes > 0 and quantize_ops
    assert all(counts["delegated"] > 0 and counts["portable"] == 0 for counts in quantize_ops.values())
    assert result.delegation["aten_convolution_default"] == {"delegated": 1, "portable": 0}
    parity = exporting.check_parity(int8_program, exporting.load_runner(path), inputs, None, batch_sizes=(1, 16))
    assert parity.top1_agreement >= 0.97 and parity.relative_diff < 0.05


@pytest.mark.slow
@needs_onnx
def test_int8_onnx_runs_as_quantize_dequantize_in_onnxruntime(int8_program, inputs, tmp_path):
    path = tmp_path / "int8.onnx"
    exporting.to_onnx(int8_program, inputs[:2], path, max_batch=MAX_BATCH)

    parity = exporting.check_parity(int8_program, exporting.load_runner(path), inputs, None, batch_sizes=(1, 16))
    assert parity.top1_agreement >= 0.97 and parity.relative_diff < 0.05


def test_parity_exposes_an_artifact_with_different_weights(model, inputs, tmp_path):
    tampered = copy.deepcopy(model)
    with torch.no_grad():
        tampered.fc.weight.copy_(torch.randn_like(tampered.fc.weight, generator=torch.Generator().manual_seed(2)))
    path = tmp_path / "tampered.pt2"
    exporting.to_pt2(exporting.export_program(tampered, inputs[:2]), path)

    parity = exporting.check_parity(model, exporting.load_runner(path), inputs, None)
    assert parity.top1_agreement < 0.5 and parity.relative_diff > 0.5


def test_unsupported_combinations_are_refused_in_one_line():
    with pytest.raises(ValueError) as refused:
        exporting.check_export_supported("pte", "xnnpack", "weight_only")
    message = str(refused.value)
    assert "\n" not in message and "silently wrong" in message
    assert "backend=xnnpack: fp32, pt2e_int8" in message and "backend=portable: fp32, weight_only" in message
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        exporting.check_export_supported("tflite", "none", "fp32")
    with pytest.raises(ValueError, match="backend=coreml"):
        exporting.check_export_supported("pte", "coreml", "fp32")
    for fmt, backend, kind in exporting.EXPORT_CAPABILITIES:
        exporting.check_export_supported(fmt, backend, kind)


def test_every_quantized_source_kind_is_known_and_at_least_exports_to_pt2():
    pt2e = {exporting.quantized_source_kind(mode, backend) for mode in ("ptq", "qat", "dynamic") for backend in ("xnnpack", "x86_inductor")}
    weight_only = {exporting.quantized_source_kind("weight_only", "torchao", dtype) for dtype in ("int8", "int4", "int8_dynamic")}
    assert pt2e | weight_only == set(exporting.SOURCE_KINDS) - {"fp32"}
    assert exporting.quantized_source_kind("qat", "xnnpack") == "pt2e_int8"
    assert all(("pt2", "none", kind) in exporting.EXPORT_CAPABILITIES for kind in exporting.SOURCE_KINDS)


class _Erfinv(nn.Module):  # not in the Core ATen opset: edge lowering rejects it
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erfinv(x.clamp(-0.5, 0.5))


class _Argsort(nn.Module):  # lowers, but the pip runtime has no aten::sort kernel
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.argsort(x, dim=1).float()


@pytest.mark.parametrize(("module", "op"), [(_Erfinv(), "aten.erfinv"), (_Argsort(), "aten::sort.values")])
def test_pte_lowering_failure_names_the_op_and_writes_nothing(module, op, tmp_path):
    program = exporting.export_program(module, torch.randn(2, 16), max_batch=4)
    with pytest.raises(ValueError, match="cannot lower to .pte") as failed:
        exporting.to_pte(program, tmp_path / "model.pte", backend="portable")
    assert op in str(failed.value) and "\n" not in str(failed.value)
    assert list(tmp_path.iterdir()) == []


def test_onnx_without_its_packages_says_how_to_install(model, inputs, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"onnxscript: pip install 'dlrun\[onnx\]'"):
        exporting.to_onnx(model, inputs[:2], tmp_path / "model.onnx")


def test_load_runner_rejects_unknown_suffixes(tmp_path):
    with pytest.raises(ValueError, match=r"expected a .pte, .pt2 or .onnx file"):
        exporting.load_runner(tmp_path / "model.tflite")
