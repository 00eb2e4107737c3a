"""Certify a pretrained deterministic CNN: the network as a point-mass posterior (one sample),
with sound IBP and CROWN bounds, next to a PGD attack.

    python examples/certify_pretrained_cnn.py          # MNIST (certbnn data; set CERTBNN_DATA), 2 epochs
    python examples/certify_pretrained_cnn.py --tiny   # generated digits-like images, seconds (CI)
"""

import os
import sys

import numpy as np
import torch
from torch import nn

import certbnn
from certbnn import data

TINY = "--tiny" in sys.argv[1:] or os.environ.get("CERTBNN_EXAMPLES_TINY") == "1"
EPS = 0.01  # a standard-trained network is certifiable only at small radii


def images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): MNIST, or in tiny mode 1x28x28 images of a bright row per class."""
    if not TINY:
        (x, y), (xt, yt) = data.load("mnist", "train").tensors(), data.load("mnist", "test").tensors()
        return x, y, xt[:200], yt[:200]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 260)
    x = rng.uniform(0, 0.2, (260, 1, 28, 28)).astype(np.float32)
    x[np.arange(260), 0, 2 * y + 4, 4:24] = 0.9
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    return x[:256], y[:256], x[256:], y[256:]


x_train, y_train, x_test, y_test = images()
torch.manual_seed(0)
net = nn.Sequential(
    nn.Conv2d(1, 8, 4, stride=2),
    nn.ReLU(),
    nn.Conv2d(8, 16, 4, stride=2),
    nn.ReLU(),
    nn.Flatten(),
    nn.Linear(16 * 5 * 5, 64),
    nn.ReLU(),
    nn.Linear(64, 10),
)
# "pretrained": plain PyTorch training, standing in for net.load_state_dict(torch.load("yours.pt"))
optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
for _epoch in range(3 if TINY else 2):
    for batch in torch.randperm(len(y_train)).split(64):
        optimiser.zero_grad()
        nn.functional.cross_entropy(net(x_train[batch]), y_train[batch]).backward()
        optimiser.step()

adv = certbnn.attack(net, None, x_test, y_test, eps=EPS, method="pgd", progress=False)
print(f"eps {EPS}: PGD accuracy {adv.adversarial_accuracy:.3f}")
for bound in ("ibp", "crown"):  # CROWN: tighter, slower; per-sample certificate: exact for one network
    report = certbnn.certify(net, None, x_test, y_test, eps=EPS, bound=bound, progress=False)
    print(f"clean accuracy {report.clean_accuracy:.3f}, {bound}-certified accuracy {report.certified_accuracy:.3f}")
    # soundness: no point certified and correct is misclassified by the attack
    broken = report.certified & report.correct & (net(adv.x_adv).argmax(-1) != y_test)
    assert not broken.any(), "a certified point was attacked successfully"
