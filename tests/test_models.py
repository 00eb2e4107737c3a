"""Model registry, spec grammar and fingerprints."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certbnn.errors import ConfigError
from certbnn.models import (
    build_model,
    describe_model,
    fingerprint_difference,
    list_models,
    make_activation,
    model_fingerprint,
    register_model,
)


def layer_kinds(model):
    return [type(m).__name__ for m in model]


def test_mnist_mlp_is_the_papers_net():
    model = build_model("mlp:512", (1, 28, 28), 10)
    assert layer_kinds(model) == ["Flatten", "Linear", "ReLU", "Linear"]
    assert (model[1].in_features, model[1].out_features) == (784, 512)
    assert (model[3].in_features, model[3].out_features) == (512, 10)
    assert layer_kinds(build_model("mnist-mlp", (1, 28, 28), 10)) == layer_kinds(model)
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_cifar_small_is_the_papers_net():
    model = build_model("cifar-small", (3, 32, 32), 10)
    assert layer_kinds(model) == [
        "Conv2d",
        "ReLU",
        "Conv2d",
        "ReLU",
        "MaxPool2d",
        "Flatten",
        "Linear",
        "ReLU",
        "Linear",
    ]
    conv1, conv2 = model[0], model[2]
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size, conv1.stride, conv1.padding) == (
        3,
        16,
        (4, 4),
        (1, 1),
        (0, 0),
    )
    assert (conv2.in_channels, conv2.out_channels, conv2.kernel_size) == (16, 32, (4, 4))
    assert model[4].kernel_size == 2
    assert model[6].in_features == 32 * 13 * 13 and model[6].out_features == 100
    assert model[8].out_features == 10
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_deep_mlp_and_tanh():
    model = build_model(" mlp: 1024, 512 @tanh", (3, 8, 8), 7)
    assert layer_kinds(model) == ["Flatten", "Linear", "Tanh", "Linear", "Tanh", "Linear"]
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [1024, 512, 7]
    assert model[1].in_features == 192


def test_cnn_grammar_stride_padding_pools():
    model = build_model("cnn:8c3s2p1,a2,4c3,p2,20@sigmoid", (1, 28, 28), 10)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert (convs[0].stride, convs[0].padding, convs[0].out_channels) == ((2, 2), (1, 1), 8)
    assert any(isinstance(m, nn.AvgPool2d) for m in model) and any(isinstance(m, nn.MaxPool2d) for m in model)
    assert sum(isinstance(m, nn.Sigmoid) for m in model) == 3
    # 28 -> 14 (s2p1) -> 7 (a2) -> 5 (c3) -> 2 (p2): 4*2*2 features into the dense layer
    assert [m for m in model if isinstance(m, nn.Linear)][0].in_features == 16
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_linear_model():
    model = build_model("linear", (5,), 3)
    assert layer_kinds(model) == ["Flatten", "Linear"]


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("resnet50", "unknown model 'resnet50'"),
        ("mlp", "needs a comma-separated"),
        ("mlp:512x512", "use commas"),
        ("mlp:0", "must be >= 1"),
        ("mlp:512,,10", "empty layer"),
        ("mlp:512@gelu", "unknown activation 'gelu'"),
        ("mlp:512@", "unknown activation"),
        ("cnn:16c40", "does not fit"),
        ("cnn:100,16c4", "must come first"),
        ("cnn:16k4", "cannot parse cnn layer '16k4'"),
        ("cifar-small:3", "takes no arguments"),
        ("linear:3", "takes no arguments"),
    ],
)
def test_bad_specs_name_the_spec(spec, fragment):
    with pytest.raises(ConfigError) as info:
        build_model(spec, (3, 32, 32), 10)
    message = str(info.value)
    assert fragment in message and repr(spec) in message and "\n" not in message


def test_bad_shapes():
    with pytest.raises(ConfigError, match="channels, height, width"):
        build_model("cifar-small", (3072,), 10)
    with pytest.raises(ConfigError, match="input_shape"):
        build_model("mlp:4", (0, 3), 10)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("mlp:4", (3,), 1)


def test_register_and_list_models():
    def tiny(arg, input_shape, num_classes, activation):
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(input_shape[0], int(arg or 2)),
            make_activation(activation),
            nn.Linear(int(arg or 2), num_classes),
        )

    register_model("test-tiny", tiny, "a test net")
    try:
        assert "test-tiny" in list_models() and list_models() == sorted(list_models())
        assert describe_model("test-tiny") == "a test net"
        model = build_model("test-tiny:6@tanh", (4,), 3)
        assert isinstance(model[2], nn.Tanh) and model[1].out_features == 6
        with pytest.raises(ConfigError, match="already registered"):
            register_model("test-tiny", tiny)
        register_model("test-tiny", lambda *a: nn.Linear(2, 2), overwrite=True)
        with pytest.raises(ConfigError, match="not nn.Sequential"):
            build_model("test-tiny", (2,), 2)
    finally:
        from certbnn import models

        models._REGISTRY.pop("test-tiny", None)
    with pytest.raises(ConfigError, match="invalid model name"):
        register_model("Bad:Name", tiny)
    for name in ("mlp", "cnn", "linear", "mnist-mlp", "cifar-small"):
        assert name in list_models()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=4), st.integers(2, 12))
def test_mlp_widths_roundtrip(widths, classes):
    model = build_model("mlp:" + ",".join(map(str, widths)), (2, 3), classes)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == widths + [classes]
    assert model(torch.zeros(1, 2, 3)).shape == (1, classes)


def test_fingerprint_lists_names_and_shapes_in_order():
    model = build_model("mlp:512", (1, 28, 28), 10)
    assert model_fingerprint(model) == {
        "parameters": [
            {"name": "1.weight", "shape": [512, 784]},
            {"name": "1.bias", "shape": [512]},
            {"name": "3.weight", "shape": [10, 512]},
            {"name": "3.bias", "shape": [10]},
        ]
    }


def test_fingerprint_difference_names_first_differing_parameter():
    small = model_fingerprint(build_model("mlp:512", (1, 28, 28), 10))
    assert fingerprint_difference(small, small) is None
    wide = model_fingerprint(build_model("mlp:256", (1, 28, 28), 10))
    assert "'1.weight'" in fingerprint_difference(small, wide)
    deep = model_fingerprint(build_model("mlp:512,20", (1, 28, 28), 10))
    assert "'3.weight' has shape (20, 512), expected (10, 512)" in fingerprint_difference(small, deep)
    truncated = {"parameters": small["parameters"][:2]}
    assert fingerprint_difference(small, truncated) == "parameter '3.weight' is missing"
    assert fingerprint_difference(truncated, small) == "unexpected parameter '3.weight'"
    reordered = {"parameters": small["parameters"][::-1]}
    assert fingerprint_difference(small, reordered) is None  # matched by name
