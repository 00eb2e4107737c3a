"""functional.forward: stacked posterior samples give what one call per sample gives."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from certbnn.errors import ConfigError
from certbnn.functional import forward, sample_size
from certbnn.models import build_model


@pytest.mark.parametrize("spec, shape", [("mlp:16", (1, 6, 6)), ("cnn:4c3,p2,8", (3, 8, 8))])
def test_stacked_samples_match_one_call_per_sample(spec, shape):
    torch.manual_seed(0)
    model = build_model(spec, shape, 5)
    params = {k: v.detach() + 0.1 * torch.randn(3, *v.shape) for k, v in model.named_parameters()}
    x = torch.rand(4, *shape, requires_grad=True)
    out = forward(model, params, x)
    assert out.shape == (3, 4, 5) and sample_size(model, params) == 3
    reference = torch.stack([functional_call(model, {k: v[i] for k, v in params.items()}, (x,)) for i in range(3)])
    assert torch.allclose(out, reference, atol=1e-6)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(reference.sum(), x)
    assert torch.allclose(g, g_ref, atol=1e-6)
    single = forward(model, {k: v[0] for k, v in params.items()}, x)
    assert single.shape == (4, 5) and torch.allclose(single, reference[0], atol=1e-6)


def test_mixed_sample_sizes_are_refused():
    model = build_model("mlp:4", (1, 2, 2), 2)
    params = dict(model.named_parameters())
    params = {k: (v.detach().expand(2, *v.shape) if i == 0 else v.detach()) for i, (k, v) in enumerate(params.items())}
    with pytest.raises(ConfigError, match="mix sample sizes"):
        forward(model, params, torch.rand(1, 1, 2, 2))


def test_forward_leaves_a_model_with_a_shared_module_unchanged():
    """functional_call alone leaves the passed tensors inside a module used twice (pytorch#164759)."""
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    params = {k: torch.full_like(v, 5.0) for k, v in model.named_parameters()}
    x = torch.randn(4, 3)
    out = forward(model, params, x)
    ref = torch.relu(x @ params["0.weight"].T + params["0.bias"]) @ params["0.weight"].T + params["0.bias"]
    torch.testing.assert_close(out, ref)
    stacked = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in params.items()}
    forward(model, stacked, x)
    for k, v in model.named_parameters():
        assert isinstance(v, nn.Parameter) and torch.equal(v, before[k]), k
