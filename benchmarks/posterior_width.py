"""Why a Gaussian posterior certifies less than another: its width, where it sits, and what
shrinking it does (issue 15, part 4: NoisyAdam and VOGN against BBB).

    .venv/bin/python benchmarks/posterior_width.py RUN_DIR [RUN_DIR ...] [--points 1000] [--scales 1,0.3,0.1,0]

For each run (a Gaussian posterior of an MLP trained on MNIST-like images) it prints:

* the median posterior std of the first layer's weights, split by input pixel: pixels that are 0
  in every training image ("dead": their weights never see data, only the prior and, under IBP,
  the box [0, eps] around 0) and the others;
* the paper-protocol certified accuracy (24 samples, IBP, sound float64) and the clean accuracy
  on the first ``--points`` test points at the run's test radius (0.1 unless ``--eps``), for the
  posterior with every std multiplied by each of ``--scales`` (scale 0 is the mean network);
* the same with only the dead pixels' weights made deterministic (std 0 there, the rest as
  trained): how much of the loss is noise on weights that carry no information.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from certbnn import api, data
from certbnn.config import load_saved_config
from certbnn.models import build_model
from certbnn.posterior import GaussianPosterior, load_posterior
from certbnn.training import CONFIG, POSTERIOR, split_train_val


def dead_pixels(run: Path) -> torch.Tensor:
    """(D,) bool: input features that are 0 in every training image of the run's config."""
    from certbnn.config import make_config

    config = make_config(load_saved_config(run / CONFIG), {})
    train, _ = split_train_val(config)
    return torch.from_numpy(np.asarray(train.images).reshape(len(train), -1).max(0) == 0)


def scaled(posterior: GaussianPosterior, factor: float, mask_first: torch.Tensor | None = None) -> GaussianPosterior:
    """The posterior with every std times ``factor`` (a point mass's tiny std for 0), or, with
    ``mask_first``, with only the first layer's std zeroed on the masked input columns."""
    mean, std = posterior.mean(), posterior.std()
    out = {}
    for i, (name, s) in enumerate(std.items()):
        if mask_first is not None:
            out[name] = s.clone()
            if i == 0:
                out[name][:, mask_first] = 1e-30
        else:
            out[name] = (s * factor).clamp_min(1e-30)
    return GaussianPosterior(mean, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--scales", default="1,0.3,0.1,0")
    args = parser.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    rows = []
    for run in args.runs:
        config = json.loads((run / CONFIG).read_text())
        spec = data.get_spec(config["dataset"])
        model = build_model(config["model"], spec.image_shape, spec.num_classes).eval()
        posterior = load_posterior(run / POSTERIOR, expected_fingerprint=model)[0]
        if not isinstance(posterior, GaussianPosterior):
            raise SystemExit(f"{run}: not a Gaussian posterior")
        test = data.load(config["dataset"], "test", config.get("data_dir"))
        test = test.subset(slice(0, args.points))
        x, y = test.tensors(dtype=torch.float32)
        dead = dead_pixels(run)
        first = next(iter(posterior.std().values()))
        row = {
            "run": str(run),
            "method": config["method"],
            "kl_weight": config["kl_weight"],
            "num_train": config["limit_train"],
            "dead_pixels": int(dead.sum()),
            "std_median_dead": float(first[:, dead].median()),
            "std_median_active": float(first[:, ~dead].median()),
            "mean_abs_median_active": float(next(iter(posterior.mean().values()))[:, ~dead].abs().median()),
        }
        for factor in [*scales, "dead0"]:
            post = scaled(posterior, 1.0, dead) if factor == "dead0" else scaled(posterior, factor)
            report = api.certify(model, post, x.numpy(), y.numpy(), args.eps, certificate="paper", progress=False)
            row[f"paper@{factor}"] = report.certified_accuracy
            row[f"clean@{factor}"] = report.clean_accuracy
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
