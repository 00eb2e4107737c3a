"""Quick per-epoch validation of a posterior: predictive accuracy and IBP certification."""

from __future__ import annotations

import torch
from torch import nn

from certbnn.bounds import compute_bounds, margin_spec, worst_case_logits
from certbnn.data import ArrayDataset
from certbnn.errors import UnsupportedLayerError
from certbnn.functional import forward
from certbnn.likelihoods import cross_entropy
from certbnn.posterior.samples import mixture_draws


@torch.no_grad()
def validate(
    model: nn.Module,
    posterior,
    dataset: ArrayDataset,
    eps: float,
    *,
    num_samples: int = 8,
    seed: int = 0,
    batch_size: int = 500,
    prefix: str = "val_",
) -> dict[str, float]:
    """Metrics of ``num_samples`` posterior draws (seeded, independent of training's RNG):

    * ``accuracy`` / ``nll``: of the Monte Carlo predictive (mean of softmaxes);
    * only when ``eps > 0``, with IBP on the box ``[x - eps, x + eps] ∩ [0, 1]``:
      ``certified``: mean over points of the fraction of sampled networks whose
      margin bounds certify the label (an estimate of E_x[P_rob(x)], not a guarantee);
      ``certified_accuracy_ibp``: fraction of points that the predictive classifies
      correctly and that pass the paper's criterion (the argmax of the mean over
      samples of softmax(worst-case logits) is the label).

    Keys carry ``prefix`` except ``certified_accuracy_ibp``. A model the bound engine
    refuses (UnsupportedLayerError: a plug-in trained with a non-robust likelihood) gets
    no certified metrics.
    """
    first = posterior.reference  # (not mean(): a sampler's posterior would stack every sample)
    generator = torch.Generator(device=first.device).manual_seed(seed)
    params = mixture_draws(posterior, num_samples, generator)  # a point mass: bounded once
    totals = {"accuracy": 0.0, "nll": 0.0, "certified": 0.0, "certified_accuracy_ibp": 0.0}
    bounded = True
    for x, y in dataset.batches(batch_size, device=first.device, dtype=first.dtype):
        logits = forward(model, params, x)  # (S, B, K)
        log_probs = torch.logsumexp(torch.log_softmax(logits, -1), 0) - torch.log(
            torch.tensor(float(logits.shape[0]), dtype=logits.dtype)
        )
        correct = log_probs.argmax(-1) == y
        totals["accuracy"] += float(correct.sum())
        totals["nll"] += float(cross_entropy(log_probs, y).sum())
        if eps > 0 and bounded:
            lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
            spec = margin_spec(y, logits.shape[-1], exclude_true=True).to(x.dtype)
            try:
                margin_lower, _ = compute_bounds(model, lower, upper, method="ibp", params=params, spec=spec)
            except UnsupportedLayerError:
                bounded = False
                continue
            totals["certified"] += float((margin_lower > 0).all(-1).to(x.dtype).mean(0).sum())
            lo, hi = compute_bounds(model, lower, upper, method="ibp", params=params)
            worst = torch.softmax(worst_case_logits(lo, hi, y), -1).mean(0)  # (B, K)
            totals["certified_accuracy_ibp"] += float((correct & (worst.argmax(-1) == y)).sum())
    n = len(dataset)
    metrics = {f"{prefix}accuracy": totals["accuracy"] / n, f"{prefix}nll": totals["nll"] / n}
    if eps > 0 and bounded:
        metrics[f"{prefix}certified"] = totals["certified"] / n
        metrics["certified_accuracy_ibp"] = totals["certified_accuracy_ibp"] / n
    return metrics
