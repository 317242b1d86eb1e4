"""The commands dlrun runs through Hydra: adding one is an entry here, its recipe dlrun/commands/<name>.py
(a `run(cfg)` function) and its config conf/<name>.yaml. `dlrun --help` and `dlrun ls` are built from this table."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    # What users type for some commands and the config path it stands for:
    # `dlrun quantize mode=qat backend=xnnpack` selects conf/quantizer/qat.yaml and sets its backend key.
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def recipe(self) -> str:
        return f"dlrun.commands.{self.name}"


COMMANDS = {
    command.name: command
    for command in (
        Command(
            "train",
            "Train a model: [bold]dlrun train model=resnet optimizer.lr=0.05[/bold] (resume with resume=RUN_DIR; "
            "trainer.devices=2 for DDP).",
        ),
        Command(
            "eval",
            "Evaluate a checkpoint, quantized program or artifact: "
            "[bold]dlrun eval run=RUN_DIR[/bold] | ckpt=PATH | artifact=PATH.",
        ),
        Command(
            "quantize",
            "Quantize a trained model: [bold]dlrun quantize mode=qat backend=xnnpack[/bold] "
            "(modes: ptq, dynamic, qat, weight_only; max_drop=0.5 keeps the most sensitive layers float).",
            aliases={"mode": "quantizer", "backend": "quantizer.backend"},
        ),
        Command(
            "export",
            "Export and verify in its runtime: [bold]dlrun export format=pte backend=xnnpack[/bold] "
            "(formats: pte, pt2, onnx).",
            aliases={"format": "export", "backend": "export.backend"},
        ),
        Command(
            "bench",
            "Benchmark every variant of a run (eager, compiled, quantized, .pte, .onnx): "
            "[bold]dlrun bench run=RUN_DIR[/bold].",
        ),
        Command(
            "profile",
            "Time every operator of a .pte with ETDump (delegated or not): "
            "[bold]dlrun profile artifact=model.pte batch=32[/bold] (or run=EXPORT_RUN).",
        ),
        Command(
            "distill",
            "Train a small student on a teacher's outputs: [bold]dlrun distill teacher=RUN_DIR "
            "model=lenet baseline=true[/bold] (resume with resume=RUN_DIR).",
        ),
        Command(
            "prune",
            "Prune channels in rounds of prune -> fine-tune: [bold]dlrun prune ratio=0.5 steps=2[/bold] "
            "(method=structured|unstructured, importance=magnitude|taylor|bn_scale, flops_ratio=...).",
            aliases={
                "method": "pruner",
                "importance": "pruner.importance",
                "scope": "pruner.scope",
                "flops_ratio": "pruner.flops_ratio",
            },
        ),
        Command(
            "tune",
            "Search hyperparameters with Optuna, pruning hopeless trials: [bold]dlrun tune search=lenet n_trials=30 "
            "trainer.epochs=10[/bold] (continue with resume=SWEEP_DIR).",
        ),
    )
}
