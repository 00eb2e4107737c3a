"""Random models, boxes and parameter perturbations for the bound-engine tests."""

from __future__ import annotations

import random

import torch
from torch import nn

from certbnn.layers import Normalize

# Box half-widths used for every randomised test; 0 is a point box.
WIDTHS = [0.0, 1e-3, 0.05, 0.3, 1.0]


def _conv_out(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def random_activation(rng: random.Random, allow_identity: bool = True) -> nn.Module:
    choices = ["relu", "relu", "leaky", "tanh", "sigmoid"] + (["identity", "dropout"] if allow_identity else [])
    kind = rng.choice(choices)
    return {
        "relu": lambda: nn.ReLU(),
        "leaky": lambda: nn.LeakyReLU(rng.choice([0.01, 0.2, -0.3, 1.5])),
        "tanh": lambda: nn.Tanh(),
        "sigmoid": lambda: nn.Sigmoid(),
        "identity": lambda: nn.Identity(),
        "dropout": lambda: nn.Dropout(0.3),
    }[kind]()


def _random_bn(num: int, two_d: bool, rng: random.Random) -> nn.Module:
    bn = (nn.BatchNorm2d if two_d else nn.BatchNorm1d)(num, affine=rng.random() < 0.8)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if bn.affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn


def random_conv(c_in: int, h: int, w: int, rng: random.Random) -> tuple[nn.Conv2d, tuple[int, int, int]] | None:
    """A random valid Conv2d for input (c_in, h, w) and its output shape, or None."""
    for _ in range(20):
        g = rng.choice([g for g in (1, 2, 3) if c_in % g == 0])
        c_out = g * rng.randint(1, 3)
        k = (rng.randint(1, 4), rng.randint(1, 4))
        s = rng.choice([1, 1, 2, 3, (1, 2)])
        s = (s, s) if isinstance(s, int) else s
        d = rng.choice([1, 1, 2, (2, 1)])
        d = (d, d) if isinstance(d, int) else d
        pad = rng.choice([0, 1, (1, 2), "same", "valid"]) if s == (1, 1) else rng.choice([0, 1, (2, 1)])
        mode = rng.choice(["zeros"] * 4 + ["reflect", "replicate", "circular"])
        if pad == "same":
            p = tuple(dd * (kk - 1) for dd, kk in zip(d, k))  # total, worst side ceil
            p = tuple((t + 1) // 2 for t in p)
        elif pad == "valid":
            p = (0, 0)
        else:
            p = (pad, pad) if isinstance(pad, int) else pad
        if mode != "zeros" and (p[0] >= h or p[1] >= w):
            mode = "zeros"
        ho = _conv_out(h, k[0], s[0], 0 if pad == "same" else p[0], d[0]) if pad != "same" else h
        wo = _conv_out(w, k[1], s[1], 0 if pad == "same" else p[1], d[1]) if pad != "same" else w
        if ho < 1 or wo < 1:
            continue
        conv = nn.Conv2d(c_in, c_out, k, s, pad, d, g, bias=rng.random() < 0.7, padding_mode=mode)
        return conv, (c_out, ho, wo)
    return None


def random_pool(c: int, h: int, w: int, rng: random.Random) -> tuple[nn.Module, tuple[int, int, int]] | None:
    for _ in range(10):
        k = rng.randint(1, 3)
        s = rng.randint(1, 3)
        p = rng.randint(0, k // 2)
        ceil = rng.random() < 0.3
        if rng.random() < 0.5:
            d = rng.choice([1, 1, 2])
            pool = nn.MaxPool2d(k, s, p, d, ceil_mode=ceil)
        else:
            pool = nn.AvgPool2d(
                k,
                s,
                p,
                ceil_mode=ceil,
                count_include_pad=rng.random() < 0.5,
                divisor_override=rng.choice([None, None, 2]),
            )
        try:
            y = pool(torch.zeros(1, c, h, w))
        except RuntimeError:
            continue
        ho, wo = y.shape[-2:]
        if ho >= 1 and wo >= 1 and bool(torch.isfinite(y).all()):  # no all-padding windows
            return pool, (c, ho, wo)
    return None


def random_cnn(rng: random.Random, depth: int, n_out: int = 3) -> tuple[nn.Sequential, tuple[int, ...]]:
    """Conv stack (with BN, pools, activations, Normalize) then Flatten + dense layers; ``depth``
    weight layers in all (1..6)."""
    torch.manual_seed(rng.randrange(2**31))  # layer initialisation reproducible from rng
    c, h, w = rng.randint(1, 3), rng.randint(4, 9), rng.randint(4, 9)
    in_shape = (c, h, w)
    layers: list[nn.Module] = []
    if rng.random() < 0.4:
        layers.append(Normalize([rng.uniform(0, 1) for _ in range(c)], [rng.uniform(0.2, 2) for _ in range(c)]))
    n_conv = rng.randint(min(1, depth - 1), depth - 1)
    for _ in range(n_conv):
        made = random_conv(c, h, w, rng)
        if made is None:
            break
        conv, (c, h, w) = made
        layers.append(conv)
        if rng.random() < 0.3:
            layers.append(_random_bn(c, True, rng))
        layers.append(random_activation(rng))
        if rng.random() < 0.4:
            made = random_pool(c, h, w, rng)
            if made is not None:
                pool, (c, h, w) = made
                layers.append(pool)
    if rng.random() < 0.5 and n_conv:
        layers.append(random_activation(rng))  # nonlinearity right before flatten
    layers.append(nn.Flatten())
    width = c * h * w
    for _ in range(depth - n_conv - 1):
        nxt = rng.randint(2, 12)
        layers += [nn.Linear(width, nxt, bias=rng.random() < 0.8), random_activation(rng)]
        width = nxt
    layers.append(nn.Linear(width, n_out))
    model = nn.Sequential(*layers)
    if rng.random() < 0.3 and len(layers) > 2:  # nest part of it
        k = rng.randint(1, len(layers) - 1)
        model = nn.Sequential(nn.Sequential(*layers[:k]), nn.Sequential(*layers[k:]))
    return model.double().eval(), in_shape


def random_mlp(rng: random.Random, depth: int, n_out: int = 3) -> tuple[nn.Sequential, tuple[int, ...]]:
    """``depth`` Linear layers (1..6) with random activations, BN1d, Dropout, Normalize."""
    torch.manual_seed(rng.randrange(2**31))
    d_in = rng.randint(1, 8)
    layers: list[nn.Module] = []
    if rng.random() < 0.3:
        layers.append(Normalize(rng.uniform(-1, 1), rng.uniform(0.2, 2)))
    width = d_in
    for i in range(depth):
        last = i == depth - 1
        nxt = n_out if last else rng.randint(1, 12)
        layers.append(nn.Linear(width, nxt, bias=rng.random() < 0.8))
        width = nxt
        if not last:
            if rng.random() < 0.2:
                layers.append(_random_bn(width, False, rng))
            layers.append(random_activation(rng))
    if rng.random() < 0.2:
        layers.append(random_activation(rng))  # output activation
    return nn.Sequential(*layers).double().eval(), (d_in,)


def random_boxes(
    in_shape: tuple[int, ...], rng: random.Random, gen: torch.Generator, batch: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` boxes of mixed widths: each one has a width from WIDTHS; one of
    them is degenerate (half its coordinates have zero width)."""
    centre = torch.rand((batch, *in_shape), generator=gen, dtype=torch.float64) * 2 - 1
    radius = torch.empty_like(centre)
    for b in range(batch):
        r = WIDTHS[b % len(WIDTHS)] if b < len(WIDTHS) else rng.choice(WIDTHS)
        radius[b] = r * torch.rand(in_shape, generator=gen, dtype=torch.float64)
    radius[-1] *= (torch.rand(in_shape, generator=gen) < 0.5).double()  # degenerate
    return centre - radius, centre + radius


def sampled_params(model: nn.Module, S: int, gen: torch.Generator, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """S perturbed copies of every parameter, stacked (S, *shape)."""
    return {
        k: v.detach().unsqueeze(0) + scale * torch.randn((S, *v.shape), generator=gen, dtype=v.dtype)
        for k, v in model.named_parameters()
    }


def weight_boxes(model: nn.Module, rng: random.Random, gen: torch.Generator) -> dict[str, tuple]:
    """Random weight intervals (radii 0 .. 0.1) on a random subset of Linear/Conv parameters."""
    boxes = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and rng.random() < 0.7:
            for pname, p in mod.named_parameters(recurse=False):
                r = rng.choice([0.0, 1e-3, 0.02, 0.1]) * torch.rand(p.shape, generator=gen, dtype=p.dtype)
                full = f"{name}.{pname}" if name else pname
                boxes[full] = (p.detach() - r, p.detach() + r)
    return boxes
