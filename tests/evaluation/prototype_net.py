"""A small trained classifier for the certificate tests: a 36-16-K ReLU MLP fitted by Adam to
K noisy 6x6 prototypes, and a Gaussian posterior of fixed std around its weights."""

from __future__ import annotations

import torch

from certbnn.functional import detached_params
from certbnn.models import build_model
from certbnn.posterior import GaussianPosterior


def prototype_net(classes: int, seed: int, steps: int, std: float, test_points: int):
    """``(model, mean params, posterior, x_test, y_test)``; deterministic for a seed. The test
    points are drawn before training, from the same prototypes as the 512 training points."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    protos = 0.2 + 0.6 * torch.rand(classes, 1, 6, 6, generator=gen)

    def data(n):
        y = torch.randint(classes, (n,), generator=gen)
        return (protos[y] + 0.08 * torch.randn(n, 1, 6, 6, generator=gen)).clamp(0, 1), y

    x_train, y_train = data(512)
    x, y = data(test_points)
    model = build_model("mlp:16", (1, 6, 6), classes)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        idx = torch.randint(512, (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    mean = detached_params(model)
    posterior = GaussianPosterior(mean, {n: torch.full_like(t, std) for n, t in mean.items()})
    return model, mean, posterior, x, y
