"""``evaluate_run(run_dir, options)``: every number of the paper's protocol for one trained run.

Writes ``evaluation.json``, ``report.md`` and plots (``reliability.png``,
``certified_vs_eps.png``, ``entropy_hist.png``) into the output directory.

Attacks and certificates run on chunks of :data:`CHUNK` test points; each chunk
draws from its own generator, seeded by (seed, part, eps, chunk index), so the
results do not depend on the order the chunks run in. Under torchrun the chunks
are dealt round-robin to the ranks and gathered on rank 0, which alone writes
files: the results are identical to a single-process run.
"""

from __future__ import annotations

import math
import re
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from certbnn import __version__, data, distributed, strict_json
from certbnn.config import load_saved_config, make_config
from certbnn.errors import CertbnnError, ConfigError
from certbnn.evaluation import ATTACKS, CERTIFICATES, certify, metrics, plots, robustness
from certbnn.fileio import atomic_write_text, check_output_dir, claim_dir, make_dir, remove_stale_temps
from certbnn.models import build_model
from certbnn.posterior import GaussianPosterior, load_posterior, mixture_draws
from certbnn.provenance import code_version, machine_info
from certbnn.settings import MILLION, SEED, UNIT, Range, at_least, between, check_settings, one_of
from certbnn.training import resolve_device

CHUNK = 250  # test points per attack / certificate call (bounds memory for CNNs with many samples)
STATISTICAL_CHUNKS = (
    10  # the statistical certificate takes this many chunks per call: one draw of samples serves more points
)


@dataclass
class EvalOptions:
    eps: list[float] = field(default_factory=lambda: [0.1])
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    certificates: list[str] = field(default_factory=lambda: ["per-sample", "paper", "statistical"])
    bound: str = "ibp"
    float64: bool = False  # predictions and attacks in float64 (certificates: see certify_float32)
    certify_float32: bool = False  # certificates in float32 (rigorous but looser); default float64
    limit: int | None = 1000
    points: str = "first"  # first: the first `limit` test points (the paper's protocol); spread: evenly spaced
    samples: int = 24
    pgd_steps: int = 20
    pgd_restarts: int = 1
    confidence: float = 0.99
    threshold: float = 0.5
    weight_box_refine: int = 0  # per-point pattern-search rounds after the weight-box grid (0: common k only)
    paper_arithmetic: str = "sound"  # paper certificate: sound (rigorous bounds) | authors (plain float32 IBP)
    ood: str | None = None
    ood_fgsm_eps: float | None = None
    radius: bool = False
    seed: int = 0
    data_dir: str | None = None
    device: str = "auto"  # cpu | cuda[:N] | auto (a GPU when present)
    chunk_size: int = CHUNK

    # ranges of the fields (types come from the annotations above; see certbnn.settings)
    SETTING_RANGES: ClassVar[dict[str, Range]] = {
        "eps": UNIT,
        "bound": one_of("ibp", "crown-ibp", "crown"),
        "limit": at_least(1),
        "points": one_of("first", "spread"),
        "samples": between(1, MILLION),
        "pgd_steps": between(1, MILLION),
        "pgd_restarts": between(1, MILLION),
        "confidence": between(0, 1, low_open=True, high_open=True),
        "threshold": UNIT,
        "weight_box_refine": at_least(0),
        "paper_arithmetic": one_of("sound", "authors"),
        "ood_fgsm_eps": UNIT,
        "seed": SEED,
        "chunk_size": at_least(1),
    }

    def validate(self) -> EvalOptions:
        """Check every option's type and range (one-line ConfigError naming it); normalises
        lists given as one value; returns self."""
        for key, value in check_settings(EvalOptions, asdict(self), what="evaluation setting").items():
            setattr(self, key, value)
        if not self.eps:
            raise ConfigError("eps needs at least one radius, got []")
        for name, given, known in (("attack", self.attacks, ATTACKS), ("certificate", self.certificates, CERTIFICATES)):
            unknown = [g for g in given if g not in known]
            if unknown:
                raise ConfigError(f"unknown {name}(s) {', '.join(unknown)} (known: {', '.join(known)})")
        if not (self.device in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ConfigError(f"device must be cpu, cuda[:N] or auto, got {self.device!r}")
        if self.ood is not None:
            data.get_spec(self.ood)  # an unknown data set fails now, not after the evaluation
        return self


def load_run(run_dir: Path):
    """(config dict, model, posterior) of a training run directory."""
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise CertbnnError(f"{run_dir}: not a training run (no config.json)")
    config = make_config(load_saved_config(config_path), {}).to_json()  # types and ranges checked
    spec = data.get_spec(config["dataset"])
    model = build_model(config["model"], spec.image_shape, spec.num_classes)
    posterior, _ = load_posterior(run_dir / "posterior.safetensors", expected_fingerprint=model)
    return config, model.eval(), posterior


def _test_set(name: str, options: EvalOptions, data_dir: str | None):
    test = data.load(name, "test", data_dir)
    if not options.limit or options.limit >= len(test):
        return test
    if options.points == "spread":  # every (len / limit)-th point: all classes even in a class-sorted test set
        return test.subset(np.arange(options.limit) * len(test) // options.limit)
    return test.subset(slice(0, options.limit))


OUTPUT_FILES = ("evaluation.json", "report.md", "reliability.png", "certified_vs_eps.png", "entropy_hist.png")
OUT_KINDS = ("eval", "run")  # certbnn folders an evaluation may write into (a new one is marked "eval")


def evaluate_run(
    run_dir: str | Path, options: EvalOptions, out_dir: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` (see module doc); returns the results dict."""
    options.validate()
    run_dir = Path(run_dir)
    # --out: new, empty, or marked by certbnn (an evaluation or a run); not "", "/" nor a file.
    # Checked before any work, claimed (marker written) by the process that writes, when it writes
    explicit_out = out_dir is not None
    out_dir = check_output_dir(out_dir, OUT_KINDS) if explicit_out else run_dir
    if distributed.current() is None or distributed.current().is_main:  # what a killed write left behind
        remove_stale_temps(out_dir, list(OUTPUT_FILES))
    config, model, posterior = load_run(run_dir)
    data_dir = options.data_dir or config.get("data_dir")
    test = _test_set(config["dataset"], options, data_dir)
    dtype = torch.float64 if options.float64 else torch.float32
    cert_dtype = torch.float32 if options.certify_float32 else torch.float64  # bounds rounded outward in either
    device = resolve_device(options.device)
    comm = distributed.current()
    progress = progress and (comm is None or comm.is_main)
    model = model.to(device=device, dtype=dtype)
    posterior = posterior.to(device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(options.seed)
    params = mixture_draws(posterior, options.samples, generator)  # a point mass: one set, not 24 copies
    x, y = test.tensors(dtype=dtype, device=device)
    chunks = Chunks(x, y, options.seed, comm, device, options.chunk_size)
    big_chunks = Chunks(x, y, options.seed, comm, device, options.chunk_size * STATISTICAL_CHUNKS)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "certbnn_version": __version__,
        "code": code_version(),
        "run": str(run_dir),
        "dataset": config["dataset"],
        "model": config["model"],
        "method": config["method"],
        "likelihood": config["likelihood"],
        "eps_train": config["eps"],
        "seed": options.seed,
        "train_seed": config["seed"],
        "device": str(device),
        "machine": machine_info(str(device)),
        "processes": comm.world_size if comm else 1,
        "num_points": len(y),
        "num_samples": options.samples,
        "distinct_samples": next(iter(params.values())).shape[0],  # 1 for a point mass
        "options": asdict(options),
    }
    seconds: dict[str, float] = {}

    def timed(part: str, began: float) -> None:
        seconds[part] = round(seconds.get(part, 0.0) + time.perf_counter() - began, 3)

    steps = len(options.eps) * (len(options.attacks) + len(options.certificates)) + 2
    bar = tqdm(total=steps, desc="evaluate", disable=not progress, unit="part")

    began = time.perf_counter()
    with torch.no_grad():
        mean_probs, sample_probs = metrics.predictive_probs(model, params, x)
    correct = mean_probs.argmax(-1) == y
    ece, bins = metrics.expected_calibration_error(mean_probs, y)
    split = metrics.uncertainty_decomposition(sample_probs)
    results["clean"] = {
        "accuracy": metrics.accuracy(mean_probs, y),
        "nll": metrics.nll(mean_probs, y),
        "brier": metrics.brier(mean_probs, y),
        "ece": ece,
        "entropy": float(split["total"].mean()),
        "aleatoric": float(split["aleatoric"].mean()),
        "epistemic": float(split["epistemic"].mean()),
        "reliability": {k: bins[k].tolist() for k in ("confidence", "accuracy", "count")},
    }
    timed("clean", began)
    bar.update()

    results["per_eps"] = []
    for eps in options.eps:
        row: dict[str, Any] = {
            "eps": eps,
            "n_points": len(y),
            "n_samples": options.samples,
            "clean_accuracy": results["clean"]["accuracy"],
            "ece": results["clean"]["ece"],
            "nll": results["clean"]["nll"],
            "brier": results["clean"]["brier"],
            "certified_accuracy": {},
        }
        for kind in options.attacks:
            began = time.perf_counter()
            adv_probs = torch.cat(
                chunks.map(
                    f"{kind}/{eps}",
                    lambda xb, yb, gen, _kind=kind, _eps=eps: _no_grad_probs(
                        model,
                        params,
                        robustness.attack(
                            model,
                            params,
                            xb,
                            yb,
                            _eps,
                            kind=_kind,
                            steps=options.pgd_steps,
                            restarts=options.pgd_restarts,
                            generator=gen,
                        ),
                    ),
                )
            )
            row[f"{kind}_accuracy"] = metrics.accuracy(adv_probs, y)
            row[f"{kind}_nll"] = metrics.nll(adv_probs, y)
            row[f"{kind}_ece"] = metrics.expected_calibration_error(adv_probs, y)[0]
            timed(kind, began)
            bar.update()
        common = {"method": options.bound, "dtype": cert_dtype}
        for name in options.certificates:
            began = time.perf_counter()
            # statistical, and paper on a ReLU MLP (the fast path blocks points itself): one draw of samples
            # per STATISTICAL_CHUNKS chunks (drawing 24 weight sets costs more than bounding 250 points)
            big = name == "statistical" or (name == "paper" and certify.mlp_linears(model) is not None)
            per_point = (big_chunks if big else chunks).map(
                f"{name}/{eps}",
                lambda xb, yb, gen, _name=name, _eps=eps, _common=common: certificate(
                    _name, model, posterior, params, xb, yb, _eps, options, gen, _common
                ),
            )
            row.update(summarise(name, per_point, correct))
            if f"{name.replace('-', '_')}_certified_accuracy" in row:
                row["certified_accuracy"][name] = row[f"{name.replace('-', '_')}_certified_accuracy"]
            timed(f"certificate:{name}", began)
            bar.update()
        results["per_eps"].append(row)

    if options.radius:

        def decision_at(xb, yb, eps):  # the same K samples at every bisection step (fixed seed)
            return certify.certify_decision(
                model,
                posterior,
                xb,
                yb,
                eps,
                num_samples=options.samples,
                method=options.bound,
                dtype=cert_dtype,
                generator=torch.Generator(device=device).manual_seed(options.seed),
            )["certified"]

        eps_max = 2 * max(max(options.eps), 0.05)
        radius = torch.cat(
            chunks.map("radius", lambda xb, yb, gen: certify.certified_radius(decision_at, xb, yb, eps_max=eps_max))
        )
        results["radius"] = {
            "certificate": "decision",
            "mean": float(radius.mean()),
            "median": float(radius.median()),
            "mean_if_correct": float((radius * correct).mean()),
            "eps_max": eps_max,
            "per_point": radius.tolist(),
        }  # per_point: the certified curve
    began = time.perf_counter()
    results["ood"] = _ood(model, params, x, y, split, options, config, data_dir, generator, dtype)
    timed("ood", began)
    if options.ood:
        for row in results["per_eps"]:
            row["ood_auroc"] = results["ood"][options.ood]["auroc_entropy"]
    bar.update()
    bar.close()
    results["seconds"] = round(time.perf_counter() - start, 2)
    results["seconds_per_part"] = seconds
    if comm is not None and not comm.is_main:
        return results

    if explicit_out:
        claim_dir(out_dir, OUT_KINDS)
    else:
        make_dir(out_dir)
    plots = _plots(out_dir, bins, results, split, options)
    results["plots"] = plots
    atomic_write_text(out_dir / "evaluation.json", strict_json.dumps(results, indent=2), "evaluation")
    atomic_write_text(out_dir / "report.md", render_report(results), "report")
    return results


def _chunks(x: torch.Tensor, y: torch.Tensor, size: int = CHUNK):
    for start in range(0, len(y), size):
        yield x[start : start + size], y[start : start + size]


class Chunks:
    """The test points in chunks of :data:`CHUNK`; :meth:`map` runs a function on each chunk
    with that chunk's own generator (seeded by seed, part and chunk index), on this rank's
    share of the chunks, and returns every chunk's result in order (gathered from all ranks)."""

    def __init__(self, x, y, seed: int, comm, device, size: int) -> None:
        self.parts = list(_chunks(x, y, size))
        self.seed, self.comm, self.device = seed, comm, device

    def generator(self, part: str, index: int) -> torch.Generator:
        key = zlib.crc32(f"{part}/{index}".encode())
        return torch.Generator(device=self.device).manual_seed((self.seed * 4_294_967_296 + key) % 2**63)

    def map(self, part: str, fn) -> list:
        rank, world = (self.comm.rank, self.comm.world_size) if self.comm else (0, 1)
        mine = {i: fn(xb, yb, self.generator(part, i)) for i, (xb, yb) in enumerate(self.parts) if i % world == rank}
        if self.comm is None:
            return [mine[i] for i in range(len(self.parts))]
        merged: dict[int, Any] = {}
        for share in self.comm.gather(_to_cpu(mine)):
            merged.update(share)
        return [_to_device(merged[i], self.device) for i in range(len(self.parts))]


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _no_grad_probs(model, params, x):
    with torch.no_grad():
        return metrics.predictive_probs(model, params, x)[0]


def certificate(name, model, posterior, params, x, y, eps, options, generator, common) -> dict[str, Any]:
    """Per-point results of one certificate on one chunk of points."""
    if name == "per-sample":
        return {"rate": certify.per_sample_certified(model, params, x, y, eps, **common).float().mean(0)}
    if name == "paper":
        if options.paper_arithmetic == "authors":  # the authors' code: plain round-to-nearest float32 IBP
            return certify.certify_paper(
                model, posterior, x, y, eps, generator=generator, method=options.bound, dtype=torch.float32, sound=False
            )
        return certify.certify_paper(model, posterior, x, y, eps, generator=generator, **common)
    if name == "statistical":
        # sound float32: rigorous, about 1.5x faster, and it lost no certified point against float64 on 500
        # MNIST test points (benchmarks/certify_bench.py; docs/speed.md section 4)
        return certify.certify_statistical(
            model,
            posterior,
            x,
            y,
            eps,
            confidence=options.confidence,
            threshold=options.threshold,
            sequential=True,
            generator=generator,
            **dict(common, dtype=torch.float32),
        )
    if name == "weight-box":
        if not isinstance(posterior, GaussianPosterior):
            return {}
        return certify.certify_weight_box(
            model,
            posterior,
            x,
            y,
            eps,
            threshold=options.threshold,
            search="grid",
            refine=options.weight_box_refine,
            **common,
        )
    return certify.certify_decision(
        model, posterior, x, y, eps, num_samples=options.samples, generator=generator, **common
    )


def summarise(name: str, chunks: list[dict[str, Any]], correct: torch.Tensor) -> dict[str, Any]:
    """Aggregate per-point certificate results over chunks into the row of the report."""

    def cat(key):
        return torch.cat([torch.as_tensor(c[key]).reshape(-1) for c in chunks])

    if name == "per-sample":
        rate = cat("rate")
        return {
            "per_sample_certified_rate": float(rate.mean()),
            "per_sample_certified_accuracy": float((rate * correct).mean()),
        }
    if name == "weight-box" and not chunks[0]:
        return {"weight_box": "not applicable (posterior is not Gaussian)"}
    key = name.replace("-", "_")
    summary = {f"{key}_certified_accuracy": certify.certified_accuracy(correct, cat("certified").bool())}
    if name == "statistical":
        summary["statistical_mean_lower"] = float(cat("lower").mean())
    if name == "weight-box":  # the lower bound on P_rob is tiny for large nets: report it in log10
        log10 = cat("log10_lower")
        verified = cat("verified").bool()
        summary["weight_box_verified_rate"] = float(verified.double().mean())
        summary["weight_box_mean_lower"] = float(cat("lower").mean())
        summary["weight_box_log10_lower"] = _distribution(log10)
        summary["weight_box_log10_lower_per_point"] = [v if math.isfinite(v) else None for v in log10.tolist()]
        summary["weight_box_median_k"] = {
            n: float(torch.cat([c["k"][n] for c in chunks])[verified].median()) if verified.any() else 0.0
            for n in chunks[0]["k"]
        }
    return summary


def _distribution(values: torch.Tensor) -> dict[str, float | None]:
    """min, 10 %, median, 90 % and max of ``values`` (nearest rank, no interpolation: -inf is
    a value); ``None`` for -inf (no verified box) so that the JSON stays standard."""
    ordered = values.double().sort().values
    out = {}
    for key, q in (("min", 0.0), ("q10", 0.1), ("median", 0.5), ("q90", 0.9), ("max", 1.0)):
        v = float(ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))])
        out[key] = v if math.isfinite(v) else None
    return out


def _ood(model, params, x, y, split, options, config, data_dir, generator, dtype) -> dict[str, Any]:
    out: dict[str, Any] = {}
    in_entropy = split["total"]
    if options.ood:
        ood = _test_set(options.ood, options, data_dir)
        if ood.image_shape != tuple(x.shape[1:]):
            raise ConfigError(
                f"OOD set {options.ood} has images {ood.image_shape}, the model expects {tuple(x.shape[1:])}"
            )
        x_ood, _ = ood.tensors(dtype=dtype, device=x.device)
        with torch.no_grad():
            _, ood_samples = metrics.predictive_probs(model, params, x_ood)
        ood_split = metrics.uncertainty_decomposition(ood_samples)
        out[options.ood] = {
            "auroc_entropy": metrics.auroc(in_entropy, ood_split["total"]),
            "auroc_epistemic": metrics.auroc(split["epistemic"], ood_split["epistemic"]),
            "mean_entropy_in": float(in_entropy.mean()),
            "mean_entropy_out": float(ood_split["total"].mean()),
        }
        out["_entropy_out"] = ood_split["total"].tolist()
    if options.ood_fgsm_eps:
        x_adv = torch.cat(
            [robustness.attack(model, params, xb, yb, options.ood_fgsm_eps, kind="fgsm") for xb, yb in _chunks(x, y)]
        )  # deterministic: every rank computes it
        with torch.no_grad():
            _, adv_samples = metrics.predictive_probs(model, params, x_adv)
        adv_entropy = metrics.uncertainty_decomposition(adv_samples)["total"]
        out[f"fgsm-{options.ood_fgsm_eps}"] = {
            "auroc_entropy": metrics.auroc(in_entropy, adv_entropy),
            "mean_entropy_out": float(adv_entropy.mean()),
        }
    return out


def _plots(out_dir: Path, bins, results, split, options) -> list[str]:
    written = []
    metrics.reliability_diagram(
        bins, out_dir / "reliability.png", title=f"{results['method']} / {results['likelihood']}"
    )
    written.append("reliability.png")
    curves = evaluation_curves(results)
    if curves:
        plots.certified_plot(
            curves,
            out_dir / "certified_vs_eps.png",
            title=f"{results['method']} / {results['likelihood']}, {results['num_points']} test points",
        )
        written.append("certified_vs_eps.png")
    entropy_out = results["ood"].pop("_entropy_out", None)
    if entropy_out is not None:
        metrics.entropy_histogram(
            split["total"],
            torch.tensor(entropy_out, device="cpu"),
            out_dir / "entropy_hist.png",
            labels=(results["dataset"], options.ood),
        )
        written.append("entropy_hist.png")
    return written


def evaluation_curves(results: dict[str, Any], prefix: str = "") -> list[plots.Curve]:
    """The certified-accuracy curves of one evaluation: the decision certificate's full curve
    from the per-point radii (``--radius``), then each certificate (and PGD accuracy) at the
    evaluated eps values."""
    curves = []
    radius = results.get("radius") or {}
    if radius.get("per_point"):
        curves.append(
            plots.Curve(f"{prefix}{radius['certificate']}", radii=radius["per_point"], eps_max=radius.get("eps_max"))
        )
    for key in (
        "paper_certified_accuracy",
        "statistical_certified_accuracy",
        "per_sample_certified_accuracy",
        "weight_box_certified_accuracy",
        "decision_certified_accuracy",
        "pgd_accuracy",
    ):
        values = [(row["eps"], row.get(key)) for row in results["per_eps"]]
        if all(isinstance(v, float) for _, v in values):
            curves.append(plots.Curve(f"{prefix}{key.replace('_', ' ')}", points=values))
    return curves


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render_report(results: dict[str, Any]) -> str:
    """A short Markdown report of an evaluation."""
    clean = results["clean"]
    authors = (
        "; paper certificate in the authors' arithmetic: plain float32, not rigorous"
        if results["options"].get("paper_arithmetic") == "authors"
        else ""
    )
    lines = [
        f"# Evaluation of `{results['run']}`",
        "",
        (
            f"{results['dataset']}, {results['method']} / {results['likelihood']}; "
            f"{results['num_points']} test points, {results['num_samples']} posterior samples, "
            f"bounds: {results['options']['bound']} "
            f"({'float32' if results['options'].get('certify_float32') else 'float64'}, rigorous{authors}); "
            f"{results['seconds']} s."
        ),
        "",
        "| clean acc | NLL | Brier | ECE | entropy | epistemic |",
        "|---|---|---|---|---|---|",
        (
            f"| {clean['accuracy']:.4f} | {clean['nll']:.4f} | {clean['brier']:.4f} | {clean['ece']:.4f} | "
            f"{clean['entropy']:.4f} | {clean['epistemic']:.4f} |"
        ),
        "",
    ]
    rows = results["per_eps"]
    keys = [k for k in rows[0] if k != "eps" and (isinstance(rows[0][k], float) or rows[0][k] is None)]
    lines += ["| metric | " + " | ".join(f"eps {row['eps']}" for row in rows) + " |", "|---|" + "---|" * len(rows)]
    for k in keys:
        lines.append(f"| {k.replace('_', ' ')} | " + " | ".join(_fmt(row.get(k)) for row in rows) + " |")
    notes = sorted({f"{k.replace('_', ' ')}: {v}" for row in rows for k, v in row.items() if isinstance(v, str)})
    lines += [""] + notes if notes else []
    if "radius" in results:
        r = results["radius"]
        lines += [
            "",
            f"Certified radius ({r['certificate']} certificate): mean {r['mean']:.4f}, median {r['median']:.4f}.",
        ]
    for row in rows:
        if "weight_box_log10_lower" in row:
            d = row["weight_box_log10_lower"]
            lines += [
                "",
                (
                    f"Weight-box certificate, eps {row['eps']}: a box verified for "
                    f"{row['weight_box_verified_rate']:.2%} of the points; lower bound on P_rob (log10) "
                    + ", ".join(f"{k} {'-inf' if v is None else f'{v:.4g}'}" for k, v in d.items())
                    + f"; certified (bound >= threshold {results['options']['threshold']}, and correct): "
                    f"{row['weight_box_certified_accuracy']:.2%}."
                ),
            ]
    for name, ood in results["ood"].items():
        lines += [
            "",
            (
                f"OOD vs {name}: AUROC (entropy) {ood['auroc_entropy']:.4f}, mean entropy out "
                f"{ood['mean_entropy_out']:.4f}."
            ),
        ]
    lines += [""] + [f"![{p}]({p})" for p in results.get("plots", [])]
    return "\n".join(lines) + "\n"
