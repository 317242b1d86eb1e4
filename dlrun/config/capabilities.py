"""What each command supports, as data: one table per command, with no torch import.

The tables drive validation (`check_supported`, `check_export_supported`), `dlrun ls quantizer`,
`dlrun ls export` and the README; each entry was verified end to end on this stack
(see tests/unit/compression/test_quantization.py and tests/unit/deploy/test_deploy.py).
"""

from __future__ import annotations

from dlrun.core.errors import Unsupported

# --- dlrun quantize -----------------------------------------------------------------------------------

MODES = ("ptq", "dynamic", "qat", "weight_only")
# weight_only is not a PT2E quantizer: it is torchao's eager `quantize_`, so it has its own backend name.
# Accepting it under backend=xnnpack would promise an XNNPACK program, and weight-only models lowered
# through XnnpackPartitioner give wrong numbers on this stack.
BACKENDS = ("xnnpack", "x86_inductor", "torchao")

# (mode, backend) -> what it does; an absent pair is unsupported. Drives validation, `dlrun ls quantizer`
# and the README table. Every entry was checked on a LeNet-style CNN, a small ResNet and torchvision resnet18.
CAPABILITIES: dict[tuple[str, str], str] = {
    ("ptq", "xnnpack"): "static int8: int8 weights, calibrated int8 activations; lowers to an ExecuTorch XNNPACK .pte",
    ("ptq", "x86_inductor"): "static int8 (uint8 activations) for torch.compile on x86 CPUs; per-channel weights only",
    ("dynamic", "xnnpack"): "int8 weights, activations quantized at run time; Linear, and Conv not followed by ReLU",
    ("dynamic", "x86_inductor"): "int8 weights, activations quantized at run time on Conv and Linear",
    ("qat", "xnnpack"): "fake-quant fine-tuning, then static int8 as ptq/xnnpack; BatchNorm folded into conv",
    ("qat", "x86_inductor"): "fake-quant fine-tuning, then static int8 as ptq/x86_inductor; BatchNorm folded into conv",
    ("weight_only", "torchao"): "eager torchao quantize_ of Linear layers (int8, int4, int8_dynamic); convs stay float",
}


def check_supported(mode: str, backend: str) -> None:
    if mode not in MODES:
        raise Unsupported(f"unknown quantization mode {mode!r}; modes: {', '.join(MODES)}")
    if backend not in BACKENDS:
        raise Unsupported(f"unknown quantization backend {backend!r}; backends: {', '.join(BACKENDS)}")
    if (mode, backend) not in CAPABILITIES:
        backends = [b for m, b in CAPABILITIES if m == mode]
        raise Unsupported(f"mode={mode} does not run on backend={backend}; it runs on backend={' or '.join(backends)}")


def capability_rows() -> list[tuple[str, str, str]]:
    return [(mode, backend, note) for (mode, backend), note in CAPABILITIES.items()]


# --- dlrun export -------------------------------------------------------------------------------------

FORMATS = ("pte", "pt2", "onnx")

# What the source program contains; the graphs differ enough that each lowers differently.
SOURCE_KINDS = {
    "fp32": "float model",
    "pt2e_int8": "static int8 PT2E program from the XNNPACK quantizer (ptq, qat)",
    "pt2e_int8_dynamic": "dynamic int8 PT2E program from the XNNPACK quantizer",
    "pt2e_int8_x86": "static int8 PT2E program from the x86-Inductor quantizer (ptq, qat)",
    "pt2e_int8_x86_dynamic": "dynamic int8 PT2E program from the x86-Inductor quantizer",
    "weight_only": "torchao int8 weight-only model (Int8WeightOnlyConfig)",
    "weight_only_int4": "torchao int4 weight-only model (IntxWeightOnlyConfig)",
    "weight_only_int8_dynamic": "torchao int8 dynamic-activation model (Int8DynamicActivationInt8WeightConfig)",
}

# (format, backend, source kind) -> note. Every entry was verified end to end (artifact loaded in its
# runtime, batch 1 and 32, parity with the source model); a combination not listed is refused.
EXPORT_CAPABILITIES: dict[tuple[str, str, str], str] = {
    ("pte", "xnnpack", "fp32"): "fp32 ops delegated to XNNPACK",
    ("pte", "xnnpack", "pt2e_int8"): "int8 ops delegated to XNNPACK",
    ("pte", "xnnpack", "pt2e_int8_dynamic"): "dynamically quantized ops delegated to XNNPACK",
    ("pte", "portable", "fp32"): "ExecuTorch portable kernels only (slow reference path)",
    ("pte", "portable", "weight_only"): "int8 weights dequantized by portable kernels",
    **{("pt2", "none", kind): "runs in PyTorch via torch.export.load" for kind in SOURCE_KINDS},
    ("onnx", "onnxruntime", "fp32"): "torch.onnx dynamo exporter",
    ("onnx", "onnxruntime", "pt2e_int8"): "QuantizeLinear/DequantizeLinear graph",
    ("onnx", "onnxruntime", "pt2e_int8_x86"): "QuantizeLinear/DequantizeLinear graph (uint8 activations)",
    ("onnx", "onnxruntime", "weight_only"): "int8 initializers dequantized in the graph",
    ("onnx", "onnxruntime", "weight_only_int4"): "int4 values in int8 initializers, dequantized in the graph",
}

# Why some tempting combinations are refused (each was tried).
_REFUSAL_REASONS = {
    ("pte", "xnnpack", "weight_only"): "XNNPACK lowering gives silently wrong outputs",
    ("pte", "xnnpack", "weight_only_int4"): "XNNPACK lowering gives silently wrong outputs",
    ("pte", "xnnpack", "pt2e_int8_x86"): "XNNPACK does not take the x86 quantizer's ops",
    ("pte", "portable", "pt2e_int8"): "the ExecuTorch runtime has no portable quantize/dequantize kernels",
    ("onnx", "onnxruntime", "pt2e_int8_dynamic"): "the exporter cannot translate choose_qparams",
}


def quantized_source_kind(mode: str, backend: str, dtype: str = "int8") -> str:
    """The source kind of a program made by dlrun.compression.quantization (mode, quantizer backend, and the
    weight_only dtype)."""
    if mode == "weight_only":
        return {"int8": "weight_only", "int4": "weight_only_int4", "int8_dynamic": "weight_only_int8_dynamic"}[dtype]
    kind = {"xnnpack": "pt2e_int8", "x86_inductor": "pt2e_int8_x86"}[backend]
    return f"{kind}_dynamic" if mode == "dynamic" else kind


def check_export_supported(fmt: str, backend: str, source_kind: str) -> None:
    """Raise a one-line ValueError unless (fmt, backend, source_kind) is in EXPORT_CAPABILITIES."""
    if (fmt, backend, source_kind) in EXPORT_CAPABILITIES:
        return
    if fmt not in FORMATS:
        raise Unsupported(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if source_kind not in SOURCE_KINDS:
        raise Unsupported(f"unknown source kind {source_kind!r}; one of {', '.join(SOURCE_KINDS)}")
    backends: dict[str, list[str]] = {}
    for f, b, kind in EXPORT_CAPABILITIES:
        if f == fmt:
            backends.setdefault(b, []).append(kind)
    supported = "; ".join(f"backend={b}: {', '.join(kinds)}" for b, kinds in backends.items())
    reason = _REFUSAL_REASONS.get((fmt, backend, source_kind))
    why = f" ({reason})" if reason else ""
    raise Unsupported(
        f"cannot export a {source_kind} model to {fmt} with backend={backend}{why}; supported for {fmt}: {supported}"
    )


# --- models a step cannot take ------------------------------------------------------------------------

# (model _target_, its input) -> {step prefix: why}; steps are "export/<format>/<dynamic_batch|fixed_batch>" and
# "quantize/<backend>", and a refusal applies to every step its key is a prefix of. Each was tried on this stack.
MODEL_REFUSALS: dict[tuple[str, str], dict[str, str]] = {
    ("dlrun.models.Recurrent", "tokens"): {
        "export": "packed variable-length sequences (pack_padded_sequence) cannot be torch.exported",
        "quantize": "quantization torch.exports the model, and packed variable-length sequences cannot be exported",
    },
    ("dlrun.models.Recurrent", "rows"): {
        "export/pte/dynamic_batch": "ExecuTorch's lowering of the recurrent op fixes the batch size to the example's; "
        "export.dynamic_batch=false works (batch 1, portable kernels)",
        "quantize/xnnpack": "it compares fp32 and int8 as XNNPACK .pte programs with a dynamic batch, which the "
        "recurrent op cannot have in ExecuTorch; use backend=x86_inductor (Linear layers int8, the cell stays fp32)",
    },
}


def check_model_supported(model: dict, step: str) -> None:
    """Refuse (Unsupported, one line) a step that MODEL_REFUSALS lists for this model and its kind of input."""
    target = str(model.get("_target_"))
    inputs = "tokens" if model.get("vocab_size") else "rows"
    for prefix, reason in MODEL_REFUSALS.get((target, inputs), {}).items():
        if step == prefix or step.startswith(prefix + "/"):
            command, option, *batch = step.split("/")
            how = f"to {option}" if command == "export" else f"with backend={option}"
            how += " with a dynamic batch" if batch == ["dynamic_batch"] else ""
            name = model.get("cell") or target.rsplit(".", 1)[-1]
            raise Unsupported(f"cannot {command} a {name} model on {inputs} {how}: {reason}")


def rich_table(group: str):
    """The capability table of `quantizer` or `export` for `dlrun ls`."""
    from rich.table import Table

    if group == "quantizer":
        table = Table(title="quantize: supported mode x backend (others are refused up front)")
        for column in ("mode", "backend", "what it does"):
            table.add_column(column, overflow="fold")
        for row in capability_rows():
            table.add_row(*row)
        for (target, inputs), refusals in MODEL_REFUSALS.items():
            for step, reason in refusals.items():
                if step.startswith("quantize"):
                    backend = step.split("/")[1] if "/" in step else "any"
                    table.add_row("any", backend, f"refused for {target.rsplit('.', 1)[-1]} on {inputs}: {reason}")
        return table
    table = Table(title="export: supported format x backend x source (others are refused up front)")
    for column in ("format", "backend", "source", "note"):
        table.add_column(column, overflow="fold")
    for (fmt, backend, kind), note in EXPORT_CAPABILITIES.items():
        table.add_row(fmt, backend, kind, note)
    for (target, inputs), refusals in MODEL_REFUSALS.items():
        for step, reason in refusals.items():
            if step.startswith("export"):
                fmt = step.split("/")[1] if "/" in step else "any"
                table.add_row(fmt, "any", f"{target.rsplit('.', 1)[-1]} on {inputs}", f"refused: {reason}")
    return table
