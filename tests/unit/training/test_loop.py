"""The one training loop (dlrun.training.loop.Loop.fit) and its callbacks, on a tiny in-memory dataset."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dlrun.core import checkpoint
from dlrun.data import Data, TensorSplit
from dlrun.training import callbacks, evaluate, loop
from helpers import read_jsonl

EPOCHS = 3
BATCHES_PER_EPOCH = 4  # 32 training samples in batches of 8
ROW_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds", "samples_per_s"]


def tiny_data() -> Data:
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        x = torch.randn(n, 4, generator=generator)
        return TensorSplit(x, (x[:, 0] > 0).long())  # learnable: the sign of the first feature

    return Data(task="classification", input_shape=(4,), num_outputs=2, train=split(32), val=split(16), test=split(16))


def make_loop(*, lr: float = 0.1, epochs: int = EPOCHS, callbacks=(), nan_policy: str = "stop", **hooks) -> loop.Loop:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = loop.FitConfig(epochs=epochs, batch_size=8, seed=0, nan_policy=nan_policy, nan_advice="Lower the lr")
    return loop.Loop(
        model,
        tiny_data(),
        optimizer,
        scheduler,
        evaluate.loss_function("classification"),
        config,
        callbacks=list(callbacks),
        **hooks,
    )


class Recorder(callbacks.Callback):
    """Records every hook call, and the state the loop showed it."""

    def __init__(self):
        self.events: list[tuple] = []

    def on_fit_start(self, loop):
        self.events.append(("fit_start", loop.state.epoch))

    def on_epoch_start(self, loop, epoch):
        self.events.append(("epoch_start", epoch))

    def on_epoch_end(self, loop, result):
        assert result.row is loop.state.rows[-1] and loop.state.epoch == result.epoch
        self.events.append(("epoch_end", result.epoch))

    def on_fit_end(self, loop):
        self.events.append(("fit_end", loop.state.epoch))


def test_fit_runs_every_epoch_and_calls_the_callbacks_in_order():
    recorder = Recorder()
    state = make_loop(callbacks=[recorder]).fit()
    per_epoch = [event for epoch in range(1, EPOCHS + 1) for event in (("epoch_start", epoch), ("epoch_end", epoch))]
    assert recorder.events == [("fit_start", 0), *per_epoch, ("fit_end", EPOCHS)]
    assert state.epoch == EPOCHS and [row["epoch"] for row in state.rows] == [1, 2, 3]
    assert list(state.rows[0]) == ROW_COLUMNS
    assert state.rows[-1]["val_accuracy"] > 0.8 and state.best_epoch >= 1  # it did learn


def test_fit_continues_after_the_state_epoch_as_a_resume_does():
    fit = make_loop()
    fit.state = loop.TrainState(epoch=2, best=0.5, best_epoch=2, rows=[{"epoch": 1}, {"epoch": 2}])
    recorder = Recorder()
    fit.callbacks = [recorder]
    fit.fit()
    assert recorder.events == [("fit_start", 2), ("epoch_start", 3), ("epoch_end", 3), ("fit_end", 3)]
    assert [row["epoch"] for row in fit.state.rows] == [1, 2, 3]


def test_early_stopping_ends_the_fit_after_patience_epochs_without_improvement():
    recorder = Recorder()
    # lr=0: the val metric never changes, so only epoch 1 improves
    state = make_loop(lr=0.0, epochs=10, callbacks=[callbacks.EarlyStopping(2), recorder]).fit()
    assert state.best_epoch == 1 and state.stale_epochs == 2 and state.should_stop
    assert state.epoch == 3 and recorder.events[-1] == ("fit_end", 3)


def test_early_stopping_without_patience_never_stops():
    assert make_loop(lr=0.0, epochs=4, callbacks=[callbacks.EarlyStopping(None)]).fit().epoch == 4


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_val_metric_never_improves_the_best(bad):
    state = loop.TrainState()
    # a diverged model still scores a finite accuracy; its NaN/inf loss must keep it from being the best
    assert not state.record({"epoch": 1}, {"loss": bad, "accuracy": 0.9, "samples": 16}, "accuracy", "max")
    assert state.best is None and state.best_epoch == 0 and state.stale_epochs == 1
    assert state.record({"epoch": 2}, {"loss": 0.5, "accuracy": 0.6, "samples": 16}, "accuracy", "max")
    assert not state.record({"epoch": 3}, {"loss": 0.4, "accuracy": bad, "samples": 16}, "accuracy", "max")
    assert (state.best, state.best_epoch, state.stale_epochs, state.epoch) == (0.6, 2, 1, 3)
    assert not state.record({"epoch": 4}, {"loss": bad, "samples": 16}, "loss", "min")  # regression monitors loss
    assert state.best_epoch == 2


def test_fit_never_marks_an_epoch_with_nan_weights_as_improved():
    """Weights made NaN before epoch 2 (the loss ignores them, so training goes on): epoch 2 validates to NaN."""

    class Poison(callbacks.Callback):
        def on_epoch_start(self, loop, epoch):
            if epoch == 2:
                with torch.no_grad():
                    loop.model.weight.fill_(math.nan)

    def constant_loss(model, x, y):
        return torch.ones((), requires_grad=True)

    improved = {}

    class Improved(callbacks.Callback):
        def on_epoch_end(self, loop, result):
            improved[result.epoch] = result.improved

    state = make_loop(epochs=2, callbacks=[Poison(), Improved()], compute_loss=constant_loss).fit()
    assert math.isnan(state.rows[1]["val_loss"])
    assert improved == {1: True, 2: False} and state.best_epoch == 1


def test_compute_loss_hook_is_what_trains():
    calls = []

    def halved_loss(model, x, y):
        calls.append(len(x))
        return nn.functional.cross_entropy(model(x), y) * 0.5

    state = make_loop(lr=0.0, epochs=2, compute_loss=halved_loss).fit()
    assert calls == [8] * BATCHES_PER_EPOCH * 2
    default = make_loop(lr=0.0, epochs=2).fit()  # lr=0: the same weights, so exactly half the default's loss
    assert [row["train_loss"] for row in state.rows] == pytest.approx([row["train_loss"] / 2 for row in default.rows])


def test_set_mode_hook_switches_train_and_eval():
    modes = []
    fit = make_loop(epochs=2, set_mode=lambda model, training: modes.append(training))
    fit.fit()
    assert modes == [True, False, True, False]  # train, then validate, each epoch


def test_a_non_finite_loss_stops_with_the_configured_advice():
    def nan_loss(model, x, y):
        return model(x).sum() * math.nan

    with pytest.raises(loop.NonFiniteLoss, match=r"at epoch 1, step 1; .*Lower the lr$"):
        make_loop(compute_loss=nan_loss).fit()
    with pytest.raises(loop.NonFiniteLoss, match=r"in every batch of epoch 1; .*Lower the lr$"):
        make_loop(compute_loss=nan_loss, nan_policy="skip_batch").fit()


def test_nan_advice_never_recommends_the_setting_in_use():
    def trainer(**settings):
        defaults = dict(
            epochs=1, batch_size=8, seed=0, eval_batch_size=64, precision="fp32", grad_clip=None, nan_policy="stop"
        )
        return SimpleNamespace(**{**defaults, **settings})

    assert "trainer.nan_policy=skip_batch" in loop.FitConfig.from_trainer(trainer()).nan_advice
    skipping = loop.FitConfig.from_trainer(trainer(nan_policy="skip_batch", grad_clip=1.0)).nan_advice
    assert "nan_policy" not in skipping and "optimizer.lr" in skipping and "lower trainer.grad_clip" in skipping


def test_on_fit_end_runs_when_fit_raises():
    recorder = Recorder()
    with pytest.raises(loop.NonFiniteLoss):
        make_loop(callbacks=[recorder], compute_loss=lambda model, x, y: model(x).sum() * math.nan).fit()
    assert recorder.events == [("fit_start", 0), ("epoch_start", 1), ("fit_end", 0)]


def test_metrics_writer_and_checkpointer_write_rows_and_resumable_checkpoints(tmp_path):
    config = {"model": {"_target_": "torch.nn.Linear"}}
    fit = make_loop(
        lr=0.0, epochs=2, callbacks=[callbacks.MetricsWriter(tmp_path), callbacks.Checkpointer(tmp_path, config)]
    )
    state = fit.fit()
    assert read_jsonl(tmp_path / "metrics.jsonl") == state.rows
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == ",".join(ROW_COLUMNS)
    last, best = checkpoint.load(tmp_path / "last.pt"), checkpoint.load(tmp_path / "best.pt")
    assert last["epoch"] == 2 and best["epoch"] == 1  # lr=0: only epoch 1 improved
    assert last["trainer_state"] == {"best": state.best, "best_epoch": 1, "stale_epochs": 1}
    assert last["config"] == config
    resumed = loop.TrainState.from_checkpoint(last["trainer_state"], last["epoch"], state.rows)
    assert resumed == loop.TrainState(epoch=2, best=state.best, best_epoch=1, stale_epochs=1, rows=state.rows)


def test_checkpointer_saves_epoch_0_before_the_first_epoch(tmp_path):
    class Interrupt(callbacks.Callback):
        def on_epoch_start(self, loop, epoch):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_loop(callbacks=[callbacks.Checkpointer(tmp_path, {}), Interrupt()]).fit()
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 0  # what `dlrun train resume=` continues from
    assert not (tmp_path / "best.pt").exists()


def test_qat_graph_trains_through_the_loop_with_its_own_mode_switch():
    """A PT2E QAT graph refuses .train()/.eval(); the loop switches it with set_qat_mode, QATPhase freezes ranges."""
    from dlrun.compression import quantization

    fit = make_loop(
        epochs=2,
        callbacks=[quantization.QATPhase(disable_observers_after=1, freeze_bn_after=1)],
        set_mode=quantization.set_qat_mode,
    )
    prepared = quantization.prepare_qat(fit.model, fit.data.example(), backend="xnnpack")
    fit.model = prepared
    fit.optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    fit.scheduler = torch.optim.lr_scheduler.LambdaLR(fit.optimizer, lambda step: 1.0)
    state = fit.fit()
    assert [row["epoch"] for row in state.rows] == [1, 2] and not prepared.training  # left in eval after validating
    with pytest.raises(NotImplementedError):
        prepared.train()  # torch's own refusal: nothing patched .train onto the graph
    enabled = [int(m.observer_enabled) for m in prepared.modules() if hasattr(m, "observer_enabled")]
    assert enabled and not any(enabled)  # epoch 2 ran with frozen quantization ranges
