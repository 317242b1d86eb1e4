"""trainer.ema (dlrun.training.ema): the Loop's average is updated after every optimizer step, validated instead
of the live weights, checkpointed with them and reloadable exactly."""

from __future__ import annotations

import torch
from test_loop import BATCHES_PER_EPOCH, make_loop
from torch import nn

from dlrun.training import ema, evaluate


def test_the_average_follows_every_step_and_is_what_the_loop_validates(monkeypatch):
    torch.manual_seed(0)
    fitting = make_loop(epochs=2)
    fitting.average = ema.average(fitting.model, 0.5)
    validated = []
    real = evaluate.evaluate
    monkeypatch.setattr(evaluate, "evaluate", lambda model, *a, **k: validated.append(model) or real(model, *a, **k))
    fitting.fit()
    assert int(fitting.average.n_averaged) == 2 * BATCHES_PER_EPOCH
    assert validated == [fitting.average.module] * 2 and fitting.evaluated is fitting.average.module
    live, averaged = fitting.model.weight, fitting.average.module.weight
    assert not torch.equal(live, averaged)  # lags behind the live weights


def test_the_update_is_decay_times_the_average_plus_the_rest_times_the_live_weights():
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    average = ema.average(model, 0.9)
    average.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update_parameters(model)
    torch.testing.assert_close(average.module.weight, torch.full((1, 2), 0.1))


def test_batchnorm_statistics_are_averaged_too():
    model = nn.BatchNorm1d(2)
    average = ema.average(model, 0.5)
    average.update_parameters(model)
    model.running_mean.fill_(2.0)
    average.update_parameters(model)
    torch.testing.assert_close(average.module.running_mean, torch.full((2,), 1.0))


def test_its_state_dict_reloads_into_a_fresh_average_exactly():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    average = ema.average(model, 0.99)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        average.update_parameters(model)
    fresh = ema.average(nn.Linear(3, 2), 0.99)
    fresh.load_state_dict(average.state_dict())
    assert int(fresh.n_averaged) == 3
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), average.state_dict().values()))
