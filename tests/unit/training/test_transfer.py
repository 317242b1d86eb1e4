"""Fine-tuning pieces (dlrun.training.transfer, .adapters): frozen parts and their BatchNorm statistics, per-group
learning rates, LoRA's wrapping and merging, and one-line errors for names that match nothing."""

from __future__ import annotations

import sys

import pytest
import torch
from omegaconf import OmegaConf

from dlrun.core.errors import UsageError
from dlrun.data import Data, TensorSplit
from dlrun.models.zoo import LeNet
from dlrun.training import adapters, evaluate, loop, schedulers, transfer

OPTIMIZER = OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})
SCHEDULER = OmegaConf.create(
    {"_target_": "dlrun.training.schedulers.step", "_partial_": True, "step_epochs": 1, "gamma": 0.5}
)


def lenet() -> LeNet:
    torch.manual_seed(0)
    return LeNet((1, 8, 8), 3, channels=(4, 8), hidden=16)


def image_data() -> Data:
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        x = torch.randn(n, 1, 8, 8, generator=generator) + 1.0  # not standardized: BN statistics would move
        return TensorSplit(x, (x[:, 0, 0, 0] > 1).long())

    return Data(
        task="classification", input_shape=(1, 8, 8), num_outputs=3, train=split(32), val=split(8), test=split(8)
    )


def train_one_epoch(model, parameters, set_mode) -> None:
    optimizer, scheduler = schedulers.build_optimization(
        OPTIMIZER, SCHEDULER, parameters, train_size=32, batch_size=8, epochs=1
    )
    loss = evaluate.loss_function("classification")
    loop.train_epoch(model, image_data(), optimizer, scheduler, loss, epoch=1, batch_size=8, seed=0, set_mode=set_mode)


def test_frozen_modules_keep_their_weights_and_batchnorm_statistics_while_the_rest_trains():
    model = lenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    transfer.freeze(model, ["features"])
    frozen = transfer.frozen_norms(model)
    assert len(frozen) == 2  # both conv blocks' BatchNorm
    groups = transfer.param_groups(model, [], 1.0)
    assert all(not name.startswith("features") for name, p in model.named_parameters() if p.requires_grad)
    train_one_epoch(model, groups, transfer.frozen_norm_mode(frozen))
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("head.") for k in changed), changed  # running_mean/var included


def test_without_the_frozen_norm_mode_batchnorm_statistics_would_move():  # the test above can fail
    model = lenet()
    before = model.state_dict()["features.0.1.running_mean"].clone()
    transfer.freeze(model, ["features"])
    train_one_epoch(model, transfer.param_groups(model, [], 1.0), loop.module_mode)
    assert not torch.equal(before, model.state_dict()["features.0.1.running_mean"])


def test_the_head_trains_at_the_optimizer_lr_and_the_backbone_at_its_ratio():
    model = lenet()
    groups = transfer.param_groups(model, ["head"], 0.1)
    optimizer, scheduler = schedulers.build_optimization(
        OPTIMIZER, SCHEDULER, groups, train_size=32, batch_size=8, epochs=2
    )
    head, backbone = optimizer.param_groups
    assert head["lr"] == pytest.approx(0.1) and backbone["lr"] == pytest.approx(0.01)
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    for _ in range(4):  # one epoch of steps: the step schedule halves both, keeping the ratio
        optimizer.step()
        scheduler.step()
    assert head["lr"] == pytest.approx(0.05) and backbone["lr"] == pytest.approx(0.005)


@pytest.mark.parametrize(
    ("call", "needles"),
    [
        (lambda m: transfer.freeze(m, ["feature"]), ["trainer.freeze", "'feature'", "features, head"]),
        (lambda m: transfer.param_groups(m, [], 0.1), ["trainer.head"]),
        (lambda m: transfer.param_groups(m, ["fc"], 0.1), ["trainer.head", "'fc'", "features, head"]),
        (lambda m: (transfer.freeze(m, ["features", "head"]), transfer.param_groups(m, [], 1.0)), ["nothing left"]),
        (lambda m: adapters.wrap(m, lora(target=["conv9"])), ["adapter.target", "'conv9'", "features.0.0"]),
        (lambda m: adapters.wrap(m, lora(train=["classifier"])), ["adapter.train", "'classifier'"]),
    ],
)
def test_names_that_match_nothing_are_one_line_naming_the_choices(call, needles):
    with pytest.raises(UsageError) as error:
        call(lenet())
    assert all(needle in str(error.value) for needle in needles), str(error.value)
    assert "\n" not in str(error.value)


def lora(**changes):
    return OmegaConf.create({"r": 2, "alpha": 4, "dropout": 0.0, "target": None, "train": ["head.4"], **changes})


def test_lora_trains_adapters_and_the_head_only_and_merges_into_the_plain_model():
    pytest.importorskip("peft")
    model = lenet()
    plain_keys = set(model.state_dict())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = adapters.wrap(model, lora())
    assert adapters.is_adapted(adapted)
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or ".modules_to_save." in name for name in trainable), trainable
    assert any("features.0.0.lora_A" in name for name in trainable)  # Conv2d adapted too
    frozen = transfer.frozen_norms(adapted)
    train_one_epoch(adapted, transfer.param_groups(adapted, [], 1.0), transfer.frozen_norm_mode(frozen))
    merged = adapters.plain_state_dict(adapted)
    assert set(merged) == plain_keys
    assert not torch.equal(merged["features.0.0.weight"], base["features.0.0.weight"])  # the adapter merged in
    assert torch.equal(merged["features.0.1.running_mean"], base["features.0.1.running_mean"])  # frozen BN
    x = image_data().test.x
    adapted.eval()
    expected = adapted(x)
    plain = adapters.unwrap(adapted)
    assert plain is model and not adapters.is_adapted(plain)
    assert set(plain.state_dict()) == plain_keys
    torch.testing.assert_close(plain(x), expected)


def test_a_missing_peft_is_one_line_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'peft>=0\.21'"):
        adapters.wrap(lenet(), lora())


def test_torchvision_weights_from_a_local_file_keep_a_fresh_head_for_another_class_count(tmp_path):
    import torchvision

    from dlrun.models import torchvision_zoo

    torch.manual_seed(1)
    pretrained = torchvision.models.resnet18().state_dict()  # ImageNet's 1000 classes, as torchvision saves it
    torch.save(pretrained, tmp_path / "resnet18.pth")
    model = torchvision_zoo.resnet18((3, 32, 32), 5, weights_path=str(tmp_path / "resnet18.pth"))
    own = model.state_dict()
    fresh = {k for k in own if not torch.equal(own[k], pretrained[k])}
    assert fresh == {"conv1.weight", "fc.weight", "fc.bias"}  # the small-image stem and the 5-class head
    with pytest.raises(UsageError, match=r"model.weights_path=.*does not fit model=mobilenet_v2.*missing keys"):
        torchvision_zoo.mobilenet_v2((3, 32, 32), 5, weights_path=str(tmp_path / "resnet18.pth"))
    with pytest.raises(UsageError, match="does not exist"):
        torchvision_zoo.resnet18((3, 32, 32), 5, weights_path=str(tmp_path / "missing.pth"))


def test_torchvision_weights_without_network_or_file_name_both_options(monkeypatch):
    from torchvision.models import _api

    from dlrun.core.errors import DlrunError
    from dlrun.models import torchvision_zoo

    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(_api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(DlrunError) as error:
        torchvision_zoo.resnet18((3, 32, 32), 10, weights="IMAGENET1K_V1")
    message = str(error.value)
    assert "model.weights_path=/path/resnet18-" in message and "/checkpoints/resnet18-" in message, message
    assert "\n" not in message
