"""The model zoo: every model on every image shape, tabular models, clear errors, pretrained weights offline."""

from __future__ import annotations

import socket
import time
import warnings

import pytest
import torch

from dlrun import models
from dlrun.config import validate
from dlrun.core.errors import DlrunError, UsageError

ALL_MODELS = ["linear", "mlp", "lenet", "googlenet", "resnet", "resnet18", "mobilenet_v2"]
CONV_MODELS = ALL_MODELS[2:]
IMAGE_DATASETS = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}  # config only: no files read


def model_cfg(*overrides: str):
    return validate.validate("train", list(overrides)).model


@pytest.mark.parametrize("dataset", IMAGE_DATASETS)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_on_every_image_shape(name, dataset):
    cfg = model_cfg(f"model={name}", f"dataset={dataset}")
    assert tuple(cfg.input_shape) == IMAGE_DATASETS[dataset]
    model = models.build(cfg)
    assert model.training  # build's dry run must not leave the model in eval mode
    with torch.no_grad():
        out = model.eval()(torch.randn(3, *IMAGE_DATASETS[dataset]))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_tabular_models(name):
    model = models.build(model_cfg(f"model={name}", "dataset=diabetes"))
    out = model(torch.randn(5, 10))
    assert out.shape == (5, 1)


@pytest.mark.parametrize("name", CONV_MODELS)
def test_conv_models_refuse_tabular_input(name):
    with pytest.raises(UsageError) as info:
        models.build(model_cfg(f"model={name}", "dataset=diabetes"))
    message = str(info.value)
    assert f"model {name} needs image input" in message and "[10]" in message
    assert "model=linear or model=mlp" in message


def test_too_small_image_is_a_usage_error():
    cfg = model_cfg("model=lenet", "dataset=synthetic", "dataset.input_shape=[1,3,3]")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused up front, not after building zero-size layers (torch warns)
        with pytest.raises(UsageError, match="lenet needs images of at least 4x4 pixels, the dataset gives 3x3"):
            models.build(cfg)


def test_model_options_are_honoured():
    model = models.build(model_cfg("model=mlp", "dataset=digits", "model.hidden=[7]"))
    assert [m.out_features for m in model if isinstance(m, torch.nn.Linear)] == [7, 10]
    model = models.build(model_cfg("model=resnet", "dataset=digits", "model.blocks_per_stage=2"))
    assert sum(isinstance(m, models.Residual) for m in model.modules()) == 6


def test_unknown_weights_name():
    with pytest.raises(DlrunError, match="unknown weights 'IMAGENET1K_V9' for resnet18"):
        models.build(model_cfg("model=resnet18", "dataset=cifar10", "model.weights=IMAGENET1K_V9"))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache, and a short socket timeout so a firewalled network fails fast instead of hanging."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    yield tmp_path
    socket.setdefaulttimeout(previous)


def weights_file(name: str, torch_home):
    import torchvision.models as tvm

    weights = tvm.get_model_weights(name).IMAGENET1K_V1
    return torch_home / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_pretrained_weights_offline_fail_with_the_cache_path(name, torch_home):
    cfg = model_cfg(f"model={name}", "dataset=cifar10", "model.weights=IMAGENET1K_V1")
    start = time.monotonic()
    with pytest.raises(DlrunError) as info:
        models.build(cfg)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert f"cannot download {name} weights" in message
    assert str(weights_file(name, torch_home)) in message and "model.weights=null" in message
    assert not weights_file(name, torch_home).exists()  # no half-downloaded file left in the cache


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_pretrained_weights_from_the_cache_load_without_network(name, torch_home, monkeypatch):
    import torchvision.models as tvm

    reference = getattr(tvm, name)().state_dict()  # ImageNet-shaped (3-channel stem, 1000 classes), random init
    path = weights_file(name, torch_home)
    path.parent.mkdir(parents=True)
    torch.save(reference, path)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to use the network although the weights are cached")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    model = models.build(model_cfg(f"model={name}", "dataset=cifar10", "model.weights=IMAGENET1K_V1"))
    own = model.state_dict()
    loaded = [k for k, v in reference.items() if k in own and own[k].shape == v.shape]
    assert len(loaded) > 0.9 * len(reference)
    for key in loaded:
        assert torch.equal(own[key], reference[key]), key
    # the adapted layers keep their own shapes: 3x3 stem for 32x32 images and a 10-way head
    head = "fc.weight" if name == "resnet18" else "classifier.1.weight"
    assert own[head].shape[0] == 10 and not torch.equal(own[head][:10], reference[head][:10])
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
