"""Posterior samples drive a plain nn.Sequential through torch.func.functional_call."""

import copy

import pytest
import torch
from torch.func import functional_call

from certbnn.models import build_model
from certbnn.posterior import GaussianPosterior, SamplePosterior


def gaussian_around(model, scale=0.05):
    params = {n: p.detach() for n, p in model.named_parameters()}
    return GaussianPosterior(params, {n: torch.full_like(p, scale) for n, p in params.items()})


def reference_outputs(model, params, x):
    """Load each weight set into a copy of the module the ordinary way and run it."""
    outputs = []
    for i in range(next(iter(params.values())).shape[0]):
        clone = copy.deepcopy(model)
        clone.load_state_dict({n: t[i] for n, t in params.items()})
        outputs.append(clone(x))
    return torch.stack(outputs)


@pytest.mark.parametrize(
    "spec, shape", [("mlp:16,8", (1, 6, 6)), ("cifar-small", (3, 32, 32)), ("cnn:4c3s2p1,p2,8@tanh", (2, 10, 10))]
)
def test_vmap_over_gaussian_samples_matches_loading_each_sample(spec, shape):
    torch.manual_seed(0)
    model = build_model(spec, shape, 5)
    x = torch.rand(3, *shape)
    params = gaussian_around(model).sample(4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = torch.vmap(lambda p: functional_call(model, p, (x,)))(params)
        looped = torch.stack([functional_call(model, {n: t[i] for n, t in params.items()}, (x,)) for i in range(4)])
        expected = reference_outputs(model, params, x)
    assert batched.shape == (4, 3, 5)
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(looped, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])  # the samples really differ


def test_sample_posterior_and_means_plug_into_functional_call():
    torch.manual_seed(0)
    model = build_model("mlp:8", (4,), 3)
    x = torch.rand(2, 4)
    draws = gaussian_around(model).sample(6)
    posterior = SamplePosterior(draws)
    with torch.no_grad():
        outputs = torch.vmap(lambda p: functional_call(model, p, (x,)))(posterior.sample(None))
        torch.testing.assert_close(outputs, reference_outputs(model, draws, x))
        torch.testing.assert_close(functional_call(model, gaussian_around(model).mean(), (x,)), model(x))
