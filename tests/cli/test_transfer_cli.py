"""Transfer learning through the CLI: the notes' "freeze the backbone, train the head, then unfreeze" recipe,
torchvision weights from a local file, LoRA fine-tuning on another task down to a quantized .pte, and an EMA run
that resumes bitwise like an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch

from dlrun.core import checkpoint
from helpers import (
    CHEAP_QUANTIZE,
    ONE_THREAD_ENV,
    TINY_MODEL,
    TINY_TRAIN,
    copy_train_run,
    error_line,
    ok,
    run_dirs,
    run_dlrun,
    subprocess_env,
    tree_hashes,
)

ENV = subprocess_env(**ONE_THREAD_ENV)
# Another task than the base run's digits, offline: 3 classes of seeded 8x8 images labelled by a random teacher.
OTHER_TASK = ("dataset=synthetic", "dataset.input_shape=[1,8,8]", "dataset.num_outputs=3", "dataset.num_samples=192")
FINE_TUNE = ("trainer.device=cpu", "trainer.epochs=1", *TINY_MODEL, *OTHER_TASK)


def dlrun(cwd, *args, python_args=()):
    return run_dlrun(args, cwd, env=ENV, python_args=python_args)


def new_run(cwd, *args, python_args=()):
    before = set(run_dirs(cwd))
    result = ok(dlrun(cwd, "train", *args, python_args=python_args))
    (added,) = set(run_dirs(cwd)) - before
    return added, result


def weights(run, name: str = "best.pt") -> dict:
    return checkpoint.load(run / "checkpoints" / name)


def equal(a: dict, b: dict, prefix: str = "") -> bool:
    keys = [k for k in b if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


def test_freeze_the_backbone_train_the_head_then_unfreeze_at_a_lower_backbone_lr(trained_run, tmp_path):
    base = weights(trained_run.run_dir)["model"]
    phase1, result = new_run(
        tmp_path,
        *FINE_TUNE,
        f"init_from={trained_run.run_dir}",
        "trainer.freeze=[features]",
        python_args=("-X", "importtime"),
    )
    assert "| dlrun.training.session" in result.stderr  # -X importtime lines: 'import time: ... | <name>'
    assert "| peft" not in result.stderr  # only adapter=lora imports PEFT (and transformers, ~5 s)
    tuned = weights(phase1)["model"]
    assert equal(tuned, base, "features.")  # conv weights and BatchNorm running statistics alike
    assert not torch.equal(tuned["head.1.weight"], base["head.1.weight"])
    summary = json.loads((phase1 / "summary.json").read_text())
    head_params = sum(v.numel() for k, v in tuned.items() if k.startswith("head."))
    assert summary["trainable_params"] == head_params < summary["params"]

    phase2, _ = new_run(
        tmp_path,
        *FINE_TUNE,
        f"init_from={phase1}",
        "trainer.head=[head]",
        "trainer.backbone_lr_ratio=0.1",
        "optimizer=sgd",
        "optimizer.lr=0.02",
        "scheduler=none",
    )
    groups = weights(phase2, "last.pt")["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.02, 0.002])
    unfrozen = weights(phase2)["model"]
    assert not torch.equal(unfrozen["features.0.0.weight"], tuned["features.0.0.weight"])
    row = json.loads((phase2 / "metrics.jsonl").read_text().splitlines()[0])
    assert row["lr"] == pytest.approx(0.02)  # the logged lr is the head's


def test_a_freeze_prefix_that_matches_no_module_lists_the_top_level_ones(tmp_path):
    result = dlrun(tmp_path, "train", *FINE_TUNE, "trainer.freeze=[backbone]")
    error_line(result, 2, "trainer.freeze", "'backbone'", "features, head")


@pytest.mark.slow  # the fast suite loads a weights file in tests/unit/training/test_transfer.py
def test_torchvision_weights_from_a_local_file_with_a_new_head(tmp_path):
    import torchvision

    torch.manual_seed(1)
    pretrained = torchvision.models.mobilenet_v2(width_mult=0.25).state_dict()  # what torchvision would download
    torch.save(pretrained, tmp_path / "mobilenet_v2.pth")
    run, result = new_run(
        tmp_path,
        "trainer.device=cpu",
        "trainer.epochs=1",
        "model=mobilenet_v2",
        "model.width_mult=0.25",
        "model.weights_path=mobilenet_v2.pth",
        "trainer.freeze=[features]",
        "dataset=synthetic",
        "dataset.input_shape=[3,16,16]",
        "dataset.num_outputs=4",
        "dataset.num_samples=96",
    )
    assert "loaded 312 of 314 tensors from model.weights_path=mobilenet_v2.pth" in result.stdout
    assert "re-initialized 2 whose shapes differ: classifier.1.weight, classifier.1.bias" in result.stdout
    tuned = weights(run)["model"]
    assert equal(tuned, pretrained, "features.")  # loaded, then frozen (BatchNorm statistics too)
    assert tuned["classifier.1.weight"].shape == (4, 1280)


def lora_run(cwd, trained_run, *args):
    return new_run(cwd, *FINE_TUNE, f"init_from={trained_run.run_dir}", "adapter=lora", "adapter.r=2", *args)


def test_lora_trains_adapters_and_the_new_head_and_checkpoints_merged_plain_weights(trained_run, tmp_path):
    base = weights(trained_run.run_dir)["model"]
    run, result = lora_run(tmp_path, trained_run)
    assert "training " in result.stdout and " parameters (" in result.stdout  # trainable of total, logged
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["trainable_params"] < summary["params"]
    best, last = weights(run), weights(run, "last.pt")
    assert best["model"].keys() == base.keys()  # plain LeNet weights: eval/quantize/export read them unchanged
    assert "adapter" in last and "adapter" not in best  # the PEFT model's own state, for a resume
    assert any(k.endswith("lora_A.default.weight") for k in last["adapter"])
    assert not torch.equal(best["model"]["features.0.0.weight"], base["features.0.0.weight"])  # adapter merged in
    assert equal(best["model"], base, "features.0.1.running")  # frozen BatchNorm statistics
    assert best["model"]["head.4.weight"].shape == (3, 32)


@pytest.mark.slow
def test_lora_fine_tune_resumes_exactly_then_quantizes_and_exports_a_pte(trained_run, tmp_path):
    straight, _ = lora_run(tmp_path, trained_run, "trainer.epochs=2", *TINY_TRAIN)
    stopped, _ = lora_run(tmp_path, trained_run, "trainer.epochs=1", *TINY_TRAIN)
    ok(dlrun(tmp_path, "train", f"resume={stopped}", "trainer.epochs=2"))
    for name in ("best.pt", "last.pt"):
        a, b = weights(straight, name), weights(stopped, name)
        assert equal(a["model"], b["model"]), name
    assert equal(weights(straight, "last.pt")["adapter"], weights(stopped, "last.pt")["adapter"])

    ok(
        dlrun(
            tmp_path,
            "quantize",
            f"run={straight}",
            "mode=ptq",
            "backend=xnnpack",
            "quantizer.calib_batches=2",
            *CHEAP_QUANTIZE,
        )
    )
    (quantized,) = run_dirs(tmp_path, "quantize")
    ok(dlrun(tmp_path, "export", f"run={quantized}", "format=pte", "backend=xnnpack"))
    (exported,) = run_dirs(tmp_path, "export")
    summary = json.loads((exported / "summary.json").read_text())
    assert summary["verification"]["passed"] and (exported / summary["artifact"].split("/")[-1]).is_file()


def test_an_ema_run_resumed_after_epoch_1_equals_an_uninterrupted_one_bitwise(tmp_path):
    ema = (*TINY_TRAIN, "trainer.ema=0.9")
    straight, _ = new_run(tmp_path, *ema, "trainer.epochs=2")
    stopped, _ = new_run(tmp_path, *ema, "trainer.epochs=1")
    result = ok(dlrun(tmp_path, "train", f"resume={stopped}", "trainer.epochs=2"))
    assert "after epoch 1" in result.stdout
    for name in ("best.pt", "last.pt"):
        a, b = weights(straight, name), weights(stopped, name)
        assert a["epoch"] == b["epoch"] == 2
        assert equal(a["model"], b["model"]), name
    live, resumed = weights(straight, "last.pt"), weights(stopped, "last.pt")
    assert equal(live["ema"], resumed["ema"]) and int(live["ema"]["n_averaged"]) > 0
    best = weights(straight)["model"]  # epoch 2 was the best: best.pt holds the average, last.pt the live weights
    assert equal({f"module.{k}": v for k, v in best.items()}, live["ema"], "module.")
    assert not equal(best, live["model"])


def test_resuming_a_run_without_an_ema_with_one_is_refused_in_one_line(trained_run, tmp_path):
    run = copy_train_run(trained_run, tmp_path)
    before = tree_hashes(run / "checkpoints")
    result = dlrun(tmp_path, "train", f"resume={run}", "trainer.epochs=5", "trainer.ema=0.9")
    error_line(result, 2, "without trainer.ema")
    assert tree_hashes(run / "checkpoints") == before
