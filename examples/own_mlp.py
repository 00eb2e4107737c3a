"""Your own MLP (``torch.relu`` in ``forward``) on your own numpy arrays: fit a certifiably robust
BNN, certify it, attack it, save and load it.

    python examples/own_mlp.py          # 4,000 images, 20 epochs
    python examples/own_mlp.py --tiny   # seconds (CI; or CERTBNN_EXAMPLES_TINY=1)
"""

import os
import sys
import tempfile

import numpy as np
import torch
from torch import nn

import certbnn

TINY = "--tiny" in sys.argv[1:] or os.environ.get("CERTBNN_EXAMPLES_TINY") == "1"


def bars(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 1, 8, 8) float32 images in [0, 1] of a noisy bar: 0 horizontal, 1 vertical, 2 diagonal."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.uniform(0.0, 0.3, (n, 1, 8, 8)).astype(np.float32)
    at = rng.integers(1, 7, n)
    for i in range(n):
        bar = np.zeros((8, 8), np.float32)
        bar[at[i], 1:7] = 1 if y[i] == 0 else 0
        bar[1:7, at[i]] = 1 if y[i] == 1 else 0
        x[i, 0] += 0.6 * (np.eye(8, dtype=np.float32) if y[i] == 2 else bar)
    return x.clip(0, 1), y


class MLP(nn.Module):
    def __init__(self, inputs: int, width: int, classes: int) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(inputs, width), nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(torch.flatten(x, 1))))


x_train, y_train = bars(512 if TINY else 4000, seed=0)
x_test, y_test = bars(16 if TINY else 500, seed=1)
model = MLP(64, 64, 3)
settings = dict(method="bbb", likelihood="ibp", eps=0.05, epochs=2 if TINY else 20, lr=0.01, progress=not TINY)
post = certbnn.fit(model, (x_train, y_train), test_data=(x_test, y_test), **settings)
print(f"test accuracy {post.metrics['test_accuracy']:.3f}")
report = certbnn.certify(model, post, x_test, y_test, eps=0.05, certificate="statistical", progress=not TINY)
adv = certbnn.attack(model, post, x_test, y_test, eps=0.05, method="pgd", progress=not TINY)
print(f"statistical certified accuracy {report.certified_accuracy:.3f}, PGD accuracy {adv.adversarial_accuracy:.3f}")
with tempfile.TemporaryDirectory() as folder:
    path = certbnn.save(post, os.path.join(folder, "post.safetensors"), model=model)
    again = certbnn.load(path, model=model)
    assert all(torch.equal(again.posterior.mean()[k], v) for k, v in post.posterior.mean().items())
print("saved and loaded the posterior")
