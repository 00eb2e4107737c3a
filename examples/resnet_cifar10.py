"""A residual CNN (your own module: skip connections, ``torch.relu``, a global mean) on CIFAR-10,
trained with robust Bayes by Backprop (IBP likelihood), then certified and attacked.

    python examples/resnet_cifar10.py          # CIFAR-10 (set CERTBNN_DATA); a GPU is advisable
    python examples/resnet_cifar10.py --tiny   # generated 3x32x32 images, seconds (CI)

The CLI's registry holds a similar net: certbnn train --model resnet:16 --dataset cifar10 ...
"""

import os
import sys

import numpy as np
import torch
from torch import nn

import certbnn
from certbnn import data

TINY = "--tiny" in sys.argv[1:] or os.environ.get("CERTBNN_EXAMPLES_TINY") == "1"
EPS = 2 / 255


class ResNet(nn.Module):
    """stem -> residual block -> strided conv -> residual block -> global mean -> logits."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.block1 = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1) for _ in range(2)])
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.block2 = nn.ModuleList([nn.Conv2d(2 * width, 2 * width, 3, padding=1) for _ in range(2)])
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.block1[1](torch.relu(self.block1[0](h))))
        h = torch.relu(self.down(h))
        h = torch.relu(h + self.block2[1](torch.relu(self.block2[0](h))))
        return self.head(h.mean(dim=(2, 3)))


if TINY:  # colour images whose class is the brightest of ten 3x3 patches
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 104)
    x = rng.uniform(0, 0.3, (104, 3, 32, 32)).astype(np.float32)
    for i, label in enumerate(y):
        x[i, :, 3 * label : 3 * label + 3, 10:13] = 1.0
    train, (x_test, y_test) = (x[:96], y[:96]), (x[96:], y[96:])
else:
    train = data.load("cifar10", "train")
    x_test, y_test = data.load("cifar10", "test").subset(np.arange(500) * 20).tensors()  # all classes

model = ResNet(width=4 if TINY else 16)
post = certbnn.fit(
    model,
    train,
    method="bbb",
    likelihood="ibp",
    eps=EPS,
    epochs=2 if TINY else 40,
    batch_size=32 if TINY else 128,
    lr=0.01 if TINY else None,
    progress=not TINY,
)
certificate = "decision" if TINY else "statistical"  # statistical: 1060 bound passes per point
report = certbnn.certify(
    model, post, x_test, y_test, eps=EPS, certificate=certificate, samples=4 if TINY else 24, progress=not TINY
)
adv = certbnn.attack(
    model, post, x_test, y_test, eps=EPS, steps=3 if TINY else 20, samples=4 if TINY else 24, progress=not TINY
)
print(
    f"clean accuracy {report.clean_accuracy:.3f}, {certificate}-certified accuracy {report.certified_accuracy:.3f}, "
    f"PGD accuracy {adv.adversarial_accuracy:.3f} at eps 2/255"
)
