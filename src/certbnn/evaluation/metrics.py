"""Calibration, uncertainty and OOD metrics of a posterior predictive (SPEC §5).

Conventions: ``probs`` are predictive class probabilities, shape (B, K), rows
summing to 1; ``sample_probs`` are per-posterior-sample probabilities, shape
(S, B, K); ``y`` are integer labels, shape (B,). Scalar metrics return Python
floats (computed in float64); per-point quantities return tensors. Entropies
are in nats. Nothing here loops over points or samples in Python.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from certbnn.errors import ConfigError
from certbnn.fileio import make_dir, save_figure
from certbnn.functional import forward


def _sampled_logits(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Logits (S, B, K); point ``params`` give S = 1."""
    logits = forward(model, params, x)
    return logits.unsqueeze(0) if logits.dim() == 2 else logits


def predictive_probs(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """Monte Carlo predictive of ``x`` (B, ...): ``(mean_probs (B, K), sample_probs (S, B, K))``.

    ``params`` stacked with a leading S are S posterior samples (one vectorised
    pass); point params give S = 1. Differentiable: wrap in ``torch.no_grad``
    when only evaluating.
    """
    sample_probs = torch.softmax(_sampled_logits(model, params, x), dim=-1)
    return sample_probs.mean(dim=0), sample_probs


def predictive_log_probs(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """log of the Monte Carlo predictive, log mean_s softmax(f_s(x)), shape (B, K); stable
    (log-sum-exp over samples), differentiable."""
    log_probs = torch.log_softmax(_sampled_logits(model, params, x), dim=-1)
    return torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])


def _check(probs: Tensor, y: Tensor | None = None) -> None:
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise ConfigError(f"probs must have shape (B, K) with B >= 1, got {tuple(probs.shape)}")
    if y is not None and tuple(y.shape) != (probs.shape[0],):
        raise ConfigError(f"labels must have shape ({probs.shape[0]},), got {tuple(y.shape)}")


def _label_probs(probs: Tensor, y: Tensor) -> Tensor:
    return probs.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)


def accuracy(probs: Tensor, y: Tensor) -> float:
    """Fraction of points whose argmax class is the label."""
    _check(probs, y)
    return (probs.argmax(dim=-1) == y).double().mean().item()


def nll(probs: Tensor, y: Tensor) -> float:
    """Mean of -log p_y over points, with p_y clamped below at the dtype's smallest
    normal number (so a zero probability gives a large finite value, not inf)."""
    _check(probs, y)
    p_y = _label_probs(probs, y).clamp_min(torch.finfo(probs.dtype).tiny)
    return (-torch.log(p_y.double())).mean().item()


def brier(probs: Tensor, y: Tensor) -> float:
    """Mean over points of sum_k (p_k - 1[k = y])^2 (multi-class Brier score, in [0, 2])."""
    _check(probs, y)
    onehot = torch.nn.functional.one_hot(y.long(), probs.shape[-1]).double()
    return ((probs.double() - onehot) ** 2).sum(dim=-1).mean().item()


def expected_calibration_error(probs: Tensor, y: Tensor, num_bins: int = 15) -> tuple[float, dict[str, Tensor]]:
    """ECE with ``num_bins`` equal-width bins on the confidence c = max_k p_k.

    Edges e_b = b / num_bins (float64). Bins are right-closed: bin b holds
    e_b < c <= e_{b+1}, and the first bin also holds c = 0 (bin 0 is
    [0, e_1]); confidences are compared in float64 as given (so float32 0.6
    is slightly above the edge 3/5). ECE = sum_b (n_b / N) |acc_b - conf_b|.

    Returns ``(ece, bins)`` where ``bins`` holds float64 tensors ``confidence``
    (mean confidence per bin), ``accuracy`` (fraction correct per bin) --
    both 0 where ``count`` is 0 -- ``count`` (int64, points per bin) and
    ``edges`` (num_bins + 1 edges).
    """
    _check(probs, y)
    if num_bins < 1:
        raise ConfigError(f"ECE needs num_bins >= 1, got {num_bins}")
    confidence, predicted = probs.double().max(dim=-1)
    correct = (predicted == y).double()
    edges = torch.arange(num_bins + 1, dtype=torch.float64, device=probs.device) / num_bins
    index = torch.bucketize(confidence, edges[1:-1], right=False)  # e_{b} < c <= e_{b+1} -> b
    count = torch.bincount(index, minlength=num_bins)
    conf_sum = torch.zeros(num_bins, dtype=torch.float64, device=probs.device).index_add_(0, index, confidence)
    correct_sum = torch.zeros_like(conf_sum).index_add_(0, index, correct)
    ece = ((correct_sum - conf_sum).abs().sum() / probs.shape[0]).item()
    denominator = count.clamp_min(1).double()
    bins = {"confidence": conf_sum / denominator, "accuracy": correct_sum / denominator, "count": count, "edges": edges}
    return ece, bins


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy -sum_k p_k log p_k over the last dim (0 log 0 = 0), in nats."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def max_probability(probs: Tensor) -> Tensor:
    """Largest class probability over the last dim (the confidence)."""
    return probs.max(dim=-1).values


def uncertainty_decomposition(sample_probs: Tensor) -> dict[str, Tensor]:
    """Split predictive entropy into aleatoric and epistemic parts, each shape (B,).

    ``total`` = H[mean_s p_s], ``aleatoric`` = mean_s H[p_s], ``epistemic`` =
    total - aleatoric, the mutual information between label and weights
    (>= 0 by Jensen, up to rounding; not clamped, so total = aleatoric + epistemic).
    """
    if sample_probs.dim() != 3:
        raise ConfigError(f"sample_probs must have shape (S, B, K), got {tuple(sample_probs.shape)}")
    total = entropy(sample_probs.mean(dim=0))
    aleatoric = entropy(sample_probs).mean(dim=0)
    return {"total": total, "aleatoric": aleatoric, "epistemic": total - aleatoric}


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """P(score of a random OOD point > score of a random in-distribution point), ties
    counted 1/2: the Mann-Whitney U statistic of the OOD scores over n_in * n_out,
    from average ranks (O(N log N)). 1.0 = perfect separation, 0.5 = chance."""
    scores_in, scores_out = scores_in.reshape(-1).double(), scores_out.reshape(-1).double()
    if scores_in.numel() == 0 or scores_out.numel() == 0:
        raise ConfigError("AUROC needs at least one in-distribution and one OOD score")
    both = torch.cat([scores_in, scores_out])
    if torch.isnan(both).any():
        raise ConfigError("AUROC scores contain NaN")
    _, inverse, counts = torch.unique(both, sorted=True, return_inverse=True, return_counts=True)
    # group of c tied values at sorted positions start+1..start+c has average rank cumsum - (c-1)/2
    group_rank = torch.cumsum(counts, 0).double() - (counts.double() - 1) / 2
    rank_out = group_rank[inverse[scores_in.numel() :]].sum()
    n_in, n_out = scores_in.numel(), scores_out.numel()
    u_out = rank_out - n_out * (n_out + 1) / 2
    return (u_out / (n_in * n_out)).item()


def _figure(size: tuple[float, float] = (4.0, 4.0)):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    make_dir(path.parent, "plot folder")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)  # atomic, never through a link at ``path``


def reliability_diagram(
    bins: Mapping[str, Tensor], path: str | Path, title: str = "Reliability diagram", label: str = "predictive"
) -> Path:
    """PNG of per-bin accuracy against mean confidence (non-empty bins) with the diagonal,
    and below it the number of points in each confidence bin (log scale, annotated);
    ``bins`` from :func:`expected_calibration_error`. Returns the written path."""
    from certbnn.evaluation.plots import reliability_plot

    as_arrays = {
        k: bins[k].detach().cpu().double().numpy() if k != "count" else bins[k].detach().cpu().numpy()
        for k in ("confidence", "accuracy", "count", "edges")
        if k in bins
    }
    return reliability_plot([(label, as_arrays)], path, title=title)


def entropy_histogram(
    in_scores: Tensor,
    out_scores: Tensor,
    path: str | Path,
    labels: tuple[str, str] = ("in-distribution", "out-of-distribution"),
    xlabel: str = "predictive entropy (nats)",
    bins: int = 30,
) -> Path:
    """PNG of overlaid, density-normalised histograms of two score sets (e.g. predictive
    entropy on in-distribution vs OOD inputs). Returns the written path."""
    scores = [s.detach().reshape(-1).cpu().double().tolist() for s in (in_scores, out_scores)]
    fig = _figure((5.0, 3.5))
    ax = fig.add_subplot()
    for values, label in zip(scores, labels):
        ax.hist(values, bins=bins, density=True, alpha=0.5, label=label)
    ax.set(xlabel=xlabel, ylabel="density")
    ax.legend(fontsize="small")
    return _save(fig, path)


def evaluate_predictive(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, num_bins: int = 15
) -> dict[str, float]:
    """Accuracy, NLL, Brier and ECE of the Monte Carlo predictive on (x, y), without
    gradients; on adversarial inputs this is calibration under attack. The whole
    batch goes through in one pass: chunk large test sets yourself."""
    with torch.no_grad():
        probs, _ = predictive_probs(model, params, x)
    ece, _ = expected_calibration_error(probs, y, num_bins)
    return {"accuracy": accuracy(probs, y), "nll": nll(probs, y), "brier": brier(probs, y), "ece": ece}
