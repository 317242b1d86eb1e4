"""model=rnn|gru|lstm: images read row by row, token ids through packed sequences (padding never changes the
answer), what the stack refuses (capability rows), and your own model class from the current directory."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from dlrun import models
from dlrun.config import capabilities, validate
from dlrun.core.errors import Unsupported, UsageError
from dlrun.models import Recurrent


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_images_are_read_one_row_per_step(cell, bidirectional):
    model = Recurrent((3, 6, 5), 4, cell=cell, hidden=8, layers=2, bidirectional=bidirectional)
    assert model.rnn.input_size == 3 * 5  # one row of every channel per step
    assert model(torch.randn(7, 3, 6, 5)).shape == (7, 4)
    assert Recurrent((10,), 1, cell=cell, hidden=8)(torch.randn(3, 10)).shape == (3, 1)  # one feature per step


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_token_input_packs_padding_away(cell):
    torch.manual_seed(0)
    model = Recurrent((6,), 3, cell=cell, hidden=8, bidirectional=True, vocab_size=20, embedding_dim=5).eval()
    short = torch.tensor([[4, 5, 6, 0, 0, 0], [7, 0, 0, 0, 0, 0]])
    longer = torch.cat([short, torch.zeros(2, 4, dtype=torch.long)], 1)  # same texts, more padding
    wide = Recurrent((10,), 3, cell=cell, hidden=8, bidirectional=True, vocab_size=20, embedding_dim=5).eval()
    wide.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(short), wide(longer), atol=1e-6)
        # ...while an unpacked read of the padding would differ (the backward direction starts on padding)
        unpacked = model.rnn(model.embedding(short))[1]
        unpacked = unpacked[0] if isinstance(unpacked, tuple) else unpacked
        assert not torch.allclose(model.head(unpacked[-2:].transpose(0, 1).flatten(1)), model(short))


def test_the_configs_build_on_digits_and_text():
    cfg = validate.validate("train", ["model=gru"])
    model = models.build(cfg.model, (1, 8, 8))
    assert isinstance(model, Recurrent) and not model.tokens and model.rnn.bidirectional
    cfg = validate.validate("train", ["model=lstm", "dataset=text_csv", "dataset.path=x.csv"])
    cfg.dataset.vocab_size, cfg.dataset.num_outputs = 30, 4  # what dlrun train fills in from the file
    model = models.build(cfg.model)  # the dry run feeds token ids (long), not floats
    assert model.tokens and model.embedding.num_embeddings == 30 and model.head[-1].out_features == 4


def test_image_gru_exports_with_a_dynamic_batch():
    from dlrun.deploy.program import export_program

    model = Recurrent((1, 8, 8), 10, hidden=16).eval()
    program = export_program(model, torch.randn(4, 1, 8, 8), max_batch=64)
    x = torch.randn(9, 1, 8, 8)
    assert torch.allclose(program.module()(x), model(x), atol=1e-5)


def test_refused_steps_are_capability_rows_with_reasons():
    image_gru = {"_target_": "dlrun.models.Recurrent", "cell": "gru", "vocab_size": None}
    text_gru = {**image_gru, "vocab_size": 40}
    capabilities.check_model_supported(image_gru, "export/pt2/dynamic_batch")
    capabilities.check_model_supported(image_gru, "export/pte/fixed_batch")
    capabilities.check_model_supported(image_gru, "quantize/x86_inductor")
    with pytest.raises(Unsupported, match="to pte with a dynamic batch: .*export.dynamic_batch=false works"):
        capabilities.check_model_supported(image_gru, "export/pte/dynamic_batch")
    with pytest.raises(Unsupported, match="backend=xnnpack: .*use backend=x86_inductor"):
        capabilities.check_model_supported(image_gru, "quantize/xnnpack")
    for step in ("export/pt2/fixed_batch", "export/onnx/dynamic_batch", "quantize/x86_inductor"):
        with pytest.raises(Unsupported, match="on tokens .*packed variable-length sequences"):
            capabilities.check_model_supported(text_gru, step)
    capabilities.check_model_supported({"_target_": "dlrun.models.LeNet"}, "export/pte/dynamic_batch")


OWN_MODULE = """
import math
from torch import nn


class MyNet(nn.Module):
    def __init__(self, input_shape, out_size=4):
        super().__init__()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), out_size))

    def forward(self, x):
        return self.fc(x)


def make_net(num_outputs):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_outputs))
"""


def test_own_model_from_the_current_directory_gets_only_the_arguments_it_takes(tmp_path, monkeypatch):
    (tmp_path / "own_models_for_test.py").write_text(OWN_MODULE)
    (tmp_path / "broken_models_for_test.py").write_text("import not_a_real_package_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # undone after the test, unlike the path build() appends
    # the default model's (lenet's) leftover keys are not passed; input_shape is, num_outputs is not
    cfg = validate.validate("train", ["model._target_=own_models_for_test.MyNet", "+model.out_size=3"])
    model = models.build(cfg.model, (1, 8, 8))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    cfg = validate.validate("train", ["model._target_=own_models_for_test.make_net"])
    assert models.build(cfg.model, (1, 8, 8))(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    for target, needle in [
        ("no_such_module_xyz.Net", "no module 'no_such_module_xyz' in the current directory"),
        ("own_models_for_test.Missing", "module own_models_for_test has no 'Missing'"),
        ("broken_models_for_test.Net", "broken_models_for_test failed: No module named 'not_a_real_package_xyz'"),
    ]:
        cfg = OmegaConf.create({"_target_": target, "input_shape": [1, 8, 8], "num_outputs": 10})
        with pytest.raises(UsageError, match=needle):
            models.build(cfg)
