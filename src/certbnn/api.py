"""The Python API: your model, your arrays, five lines (issue 14)::

    import certbnn
    post = certbnn.fit(model, (x_train, y_train), method="bbb", likelihood="ibp", eps=0.1, epochs=20)
    report = certbnn.certify(model, post, x_test, y_test, eps=0.1, certificate="statistical")
    adv = certbnn.attack(model, post, x_test, y_test, eps=0.1, method="pgd")
    certbnn.save(post, "post.safetensors", model=model); post = certbnn.load("post.safetensors", model=model)

A thin layer over what the CLI runs, so both give the same numbers, errors and files:

* :func:`fit` registers the arrays as an in-memory data set (:func:`certbnn.data.register_arrays`)
  and calls :func:`certbnn.training.train`, the loop behind ``certbnn train``: the same defaults
  (tempered posterior T = 0.01, the eps ramp), settings checks, checkpoint every epoch, resume,
  determinism from ``seed`` and progress bars. Without ``out`` the run lives in a temporary folder.
* :func:`certify` and :func:`attack` run the certificates and attacks of ``certbnn evaluate``
  (:mod:`certbnn.evaluation.runner`): the same options (checked by
  :class:`~certbnn.evaluation.runner.EvalOptions`), the same per-chunk generators, hence the
  same per-point results as ``certbnn evaluate`` for the same posterior, points and seed.
* :func:`save` / :func:`load` are :func:`certbnn.posterior.save_posterior` /
  :func:`~certbnn.posterior.load_posterior` (one safetensors file, atomic and link-safe writes).

``model`` is a plain ``nn.Module`` mapping ``(B, C, H, W)`` inputs in [0, 1] to ``(B, K)``
logits (or, in :func:`fit`, a registry spec such as ``"mlp:512"``); posteriors are data applied
with ``torch.func.functional_call``, so the module's own weights are never changed. A
deterministic module is certified as a point mass: ``certify(model, None, ...)`` or
:func:`point_mass`. Every bad input is a one-line :class:`~certbnn.errors.ConfigError`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from certbnn import data, strict_json
from certbnn.api_inputs import arrays, check_labels, dataset_name, points
from certbnn.config import TrainConfig
from certbnn.errors import ConfigError
from certbnn.evaluation import metrics
from certbnn.evaluation.robustness import attack as attack_predictive
from certbnn.evaluation.runner import Chunks, EvalOptions, summarise
from certbnn.evaluation.runner import certificate as run_certificate
from certbnn.fileio import atomic_write_text
from certbnn.models import (
    fingerprint_difference,
    fingerprint_of_params,
    model_fingerprint,
)
from certbnn.posterior import (
    GaussianPosterior,
    Posterior,
    SamplePosterior,
    load_posterior,
    mixture_draws,
    save_posterior,
)
from certbnn.settings import check_settings
from certbnn.training import POSTERIOR, resolve_device, train

__all__ = ["AttackResult", "CertifyReport", "FitResult", "attack", "certify", "fit", "load", "point_mass", "save"]

#: TrainConfig fields :func:`fit` sets itself (the data set and the model come as arguments).
_FIT_OWNED = ("dataset", "data_dir", "dataset_file", "dataset_sha256", "model")


@dataclass
class FitResult:
    """A fitted (or loaded) posterior with what training recorded.

    ``posterior``: :class:`~certbnn.posterior.GaussianPosterior` (bbb, noisy-adam, vogn) or
    :class:`~certbnn.posterior.SamplePosterior` (sgd, adam, swag, hmc, sghmc), on the CPU;
    ``metadata``: the posterior file's metadata (method, likelihood, eps, temperature,
    method_settings, final metrics, config); ``run_dir``: the run folder kept by ``fit(out=...)``
    (None for a temporary run or a loaded file)."""

    posterior: Posterior
    metadata: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        """The final metrics training recorded (last epoch, and test accuracy when a test set was given)."""
        return dict(self.metadata.get("metrics") or {})


@dataclass
class CertifyReport:
    """Per-point results of one certificate at one radius.

    ``certified`` (N,) bool: the certificate's decision per point (``per-sample``: every drawn
    weight sample certified); ``correct`` (N,) bool: the predictive (mean softmax of ``samples``
    draws) is right; ``certified_fraction``: mean of ``certified``; ``certified_accuracy``: the
    fraction correct *and* certified, the number ``certbnn evaluate`` reports for this
    certificate (``summary`` holds its whole row: e.g. ``statistical_mean_lower``);
    ``details``: the certificate's other per-point values (``lower``, ``upper``, ``p_hat`` of the
    statistical test, ``rate`` of per-sample, ``p_lower`` of decision, ...); ``settings``: the
    options used."""

    certificate: str
    eps: float
    certified: Tensor
    correct: Tensor
    certified_fraction: float
    certified_accuracy: float
    clean_accuracy: float
    summary: dict[str, Any]
    details: dict[str, Tensor]
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (tensors as lists; non-finite floats become null in :meth:`write_json`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["certified"], out["correct"] = self.certified.tolist(), self.correct.tolist()
        out["details"] = {k: v.tolist() for k, v in self.details.items()}
        return out

    def write_json(self, path: str | Path) -> None:
        """Write :meth:`to_json` as strict JSON, atomically (a link at ``path`` is replaced, never followed)."""
        atomic_write_text(path, strict_json.dumps(self.to_json(), indent=2), "certificate report")


@dataclass
class AttackResult:
    """``x_adv`` (N, ...) adversarial inputs (CPU, detached) within ``eps`` of ``x`` in l_inf and in
    [0, 1]; the predictive's ``clean_accuracy`` and ``adversarial_accuracy`` / ``adversarial_nll``
    on ``x_adv`` (the numbers ``certbnn evaluate`` reports as ``<method>_accuracy`` / ``_nll``);
    ``settings``: the options used."""

    method: str
    eps: float
    x_adv: Tensor
    clean_accuracy: float
    adversarial_accuracy: float
    adversarial_nll: float
    settings: dict[str, Any]


# --- fit --------------------------------------------------------------------------------------


def fit(
    model: nn.Module | str,
    train_data: Any,
    *,
    method: str = "bbb",
    likelihood: str = "ibp",
    eps: float = 0.11,
    epochs: int = 20,
    seed: int = 0,
    val_size: int = 0,
    test_data: Any = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    **settings: Any,
) -> FitResult:
    """Fit a posterior over ``model``'s parameters with the loop of ``certbnn train``.

    ``train_data``: ``(x, y)`` arrays or tensors (``x`` (N, C, H, W), float in [0, 1] or uint8
    pixels; ``y`` (N,) integer labels), an :class:`~certbnn.data.ArrayDataset`, or an iterable
    of ``(x, y)`` batches such as a ``DataLoader`` (read once into memory; training then
    shuffles it per epoch from ``seed`` like any data set). ``test_data`` (same forms): scored
    at the end into ``metrics['test_accuracy']``. ``val_size`` examples are held out for
    per-epoch validation (the CLI's default is 1000; here 0).

    ``model``: an ``nn.Module`` (trained from its current weights; its own parameters are left
    unchanged, it is moved to ``device`` and run in eval mode) or a registry spec string
    (built, as by the CLI, from ``seed``). ``settings``: any other ``certbnn train`` setting
    (:class:`~certbnn.config.TrainConfig`: ``lam``, ``batch_size``, ``lr``, ``kl_weight``,
    ``warmup_epochs``, ``ramp_fraction``, ``device``, ``method_options``, ...), at the CLI's
    defaults when not given. ``out``: keep the run folder there (config, checkpoint after every
    epoch, posterior, metrics); ``resume=True`` continues it after a kill to the result an
    uninterrupted run gives. The same ``seed`` and initial weights give the same posterior.
    """
    if resume and out is None:
        raise ConfigError("resume=True continues the run in out=...; name the run folder")
    misplaced = sorted(set(settings) & set(_FIT_OWNED))
    if misplaced:
        raise ConfigError(f"fit takes the data and the model as arguments, not the setting(s) {', '.join(misplaced)}")
    x, y = arrays(train_data, "train_data")
    test = arrays(test_data, "test_data") if test_data is not None else None
    if test is not None and test[0].shape[1:] != x.shape[1:]:
        raise ConfigError(f"test_data images have shape {test[0].shape[1:]}, train_data {x.shape[1:]}")
    if isinstance(model, str):
        num_classes, module, label = max(2, int(y.max()) + 1), None, model
    elif isinstance(model, nn.Module):
        num_classes, module, label = _num_outputs(model, x), model, _label(model)
    else:
        raise ConfigError(f"model must be an nn.Module or a model spec string, got {type(model).__name__}")
    check_labels(y, num_classes, "train_data y")
    if test is not None:
        check_labels(test[1], num_classes, "test_data y")
    splits = {"train": (x, y), **({"test": test} if test is not None else {})}
    name = dataset_name(splits)
    values = {
        **settings,
        "dataset": name,
        "model": label,
        "method": method,
        "likelihood": likelihood,
        "eps": eps,
        "epochs": epochs,
        "seed": seed,
        "val_size": val_size,
    }
    config = TrainConfig(**check_settings(TrainConfig, values))
    data.register_arrays(name, splits, num_classes=num_classes)
    try:
        with contextlib.ExitStack() as stack:
            run_dir = (
                Path(out)
                if out is not None
                else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="certbnn-fit-"))) / "run"
            )
            if module is not None:
                stack.enter_context(_eval_mode(module))
            train(config, run_dir, resume=resume, progress=progress, log=print if progress else _silent, model=module)
            posterior, metadata = load_posterior(run_dir / POSTERIOR)
    finally:
        data.unregister(name)
    return FitResult(posterior, metadata, Path(out) if out is not None else None)


# --- certify and attack -----------------------------------------------------------------------


def point_mass(model: nn.Module) -> SamplePosterior:
    """The deterministic network as a posterior: one sample, ``model``'s own parameters (copied)."""
    params = {name: p.detach().clone().unsqueeze(0) for name, p in model.named_parameters()}
    if not params:
        raise ConfigError(f"{type(model).__name__} has no parameters to put a posterior on")
    return SamplePosterior(params)


_CLI = EvalOptions  # the defaults of `certbnn evaluate`


def certify(
    model: nn.Module,
    posterior: Any,
    x: Any,
    y: Any,
    eps: float = 0.1,
    *,
    certificate: str | None = None,
    bound: str = _CLI.bound,
    samples: int | None = None,
    confidence: float = _CLI.confidence,
    threshold: float = _CLI.threshold,
    weight_box_refine: int = _CLI.weight_box_refine,
    seed: int = _CLI.seed,
    device: str = _CLI.device,
    float64: bool = _CLI.float64,
    certify_float32: bool = _CLI.certify_float32,
    chunk_size: int = _CLI.chunk_size,
    progress: bool = True,
) -> CertifyReport:
    """One certificate of ``certbnn evaluate`` at radius ``eps`` on the points ``x`` (N, ...) in
    [0, 1] with labels ``y`` (N,); rigorous in floating point (float64 bounds unless
    ``certify_float32``).

    ``posterior``: a :class:`FitResult`, a posterior, or None (``model`` as a point mass,
    :func:`point_mass`). ``certificate``: ``statistical`` (exact one-sided binomial test of
    P_rob >= ``threshold`` at level 1 - ``confidence``), ``per-sample``, ``paper``,
    ``weight-box`` (Gaussian posteriors) or ``decision``; default ``per-sample`` for a one-sample
    posterior (exact for a deterministic network), ``statistical`` otherwise. ``samples``: the
    draws of the predictive and of the per-sample / decision certificates (default 24, 1 for a
    one-sample posterior). ``bound``: ``ibp``, ``crown-ibp`` or ``crown``. Same ``seed``, same
    results; equal to ``certbnn evaluate --seed`` on the same points and chunks.
    """
    posterior = _posterior_of(posterior, model)
    one = isinstance(posterior, SamplePosterior) and posterior.num_samples == 1
    name = certificate if certificate is not None else ("per-sample" if one else "statistical")
    if name == "weight-box" and not isinstance(posterior, GaussianPosterior):
        raise ConfigError(
            f"the weight-box certificate needs a Gaussian posterior (bbb, noisy-adam, vogn), "
            f"got {type(posterior).__name__}"
        )
    options = _options(
        eps,
        certificates=[name],
        attacks=[],
        bound=bound,
        samples=samples or (1 if one else _CLI.samples),
        confidence=confidence,
        threshold=threshold,
        weight_box_refine=weight_box_refine,
        seed=seed,
        device=device,
        float64=float64,
        certify_float32=certify_float32,
        chunk_size=chunk_size,
    )
    with _evaluation(model, posterior, x, y, options) as (placed, moved, params, _, ys, chunks, probs):
        correct = probs.argmax(-1) == ys
        common = {"method": options.bound, "dtype": torch.float32 if certify_float32 else torch.float64}
        eps_value = options.eps[0]
        per_chunk = chunks.map(
            f"{name}/{eps_value}",
            _progress(
                lambda xb, yb, gen: run_certificate(
                    name, placed, moved, params, xb, yb, eps_value, options, gen, common
                ),
                len(chunks.parts),
                f"certify {name}",
                progress,
            ),
        )
        summary = summarise(name, per_chunk, correct)
    details = {
        key: torch.cat([torch.as_tensor(c[key]).reshape(-1).cpu() for c in per_chunk])
        for key, value in per_chunk[0].items()
        if isinstance(value, Tensor) and value.dim() == 1
    }
    decided = details.pop("certified") if "certified" in details else details["rate"] == 1.0
    key = name.replace("-", "_")
    return CertifyReport(
        certificate=name,
        eps=eps_value,
        certified=decided.bool(),
        correct=correct.cpu(),
        certified_fraction=float(decided.double().mean()),
        certified_accuracy=summary[f"{key}_certified_accuracy"],
        clean_accuracy=metrics.accuracy(probs, ys),
        summary=summary,
        details=details,
        settings=dataclasses.asdict(options),
    )


def attack(
    model: nn.Module,
    posterior: Any,
    x: Any,
    y: Any,
    eps: float = 0.1,
    *,
    method: str = "pgd",
    steps: int = _CLI.pgd_steps,
    restarts: int = _CLI.pgd_restarts,
    samples: int | None = None,
    seed: int = _CLI.seed,
    device: str = _CLI.device,
    float64: bool = _CLI.float64,
    chunk_size: int = _CLI.chunk_size,
    progress: bool = True,
) -> AttackResult:
    """EOT attack (``fgsm`` or ``pgd``: ``steps`` steps of 2.5 eps / steps, random start,
    ``restarts``) on the posterior predictive of ``samples`` draws (default 24, 1 for a
    one-sample posterior), as ``certbnn evaluate`` runs it; ``posterior`` as in :func:`certify`."""
    posterior = _posterior_of(posterior, model)
    one = isinstance(posterior, SamplePosterior) and posterior.num_samples == 1
    options = _options(
        eps,
        certificates=[],
        attacks=[method],
        samples=samples or (1 if one else _CLI.samples),
        pgd_steps=steps,
        pgd_restarts=restarts,
        seed=seed,
        device=device,
        float64=float64,
        chunk_size=chunk_size,
    )
    with _evaluation(model, posterior, x, y, options) as (placed, _, params, _, ys, chunks, probs):
        eps_value = options.eps[0]
        x_adv = torch.cat(
            chunks.map(
                f"{method}/{eps_value}",
                _progress(
                    lambda xb, yb, gen: attack_predictive(
                        placed, params, xb, yb, eps_value, kind=method, steps=steps, restarts=restarts, generator=gen
                    ),
                    len(chunks.parts),
                    f"attack {method}",
                    progress,
                ),
            )
        )
        with torch.no_grad():
            adv_probs = metrics.predictive_probs(placed, params, x_adv)[0]
        return AttackResult(
            method=method,
            eps=eps_value,
            x_adv=x_adv.detach().cpu(),
            clean_accuracy=metrics.accuracy(probs, ys),
            adversarial_accuracy=metrics.accuracy(adv_probs, ys),
            adversarial_nll=metrics.nll(adv_probs, ys),
            settings=dataclasses.asdict(options),
        )


# --- save and load ----------------------------------------------------------------------------


def save(
    posterior: Any, path: str | Path, *, model: nn.Module | None = None, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write a posterior (or :class:`FitResult`, with its training metadata) to one safetensors
    file, atomically (a link at ``path`` is replaced, its target never written). With ``model``
    the posterior must match its parameters (names and shapes), recorded for :func:`load`."""
    meta = dict(posterior.metadata) if isinstance(posterior, FitResult) else {}
    meta.update(metadata or {})
    save_posterior(path, _unwrap(posterior), meta, model=model)
    return Path(path)


def load(path: str | Path, *, model: nn.Module | None = None) -> FitResult:
    """Read a posterior file (or a run folder's ``posterior.safetensors``); with ``model``, a
    one-line ConfigError unless its parameters match the stored architecture."""
    path = Path(path)
    posterior, metadata = load_posterior(path / POSTERIOR if path.is_dir() else path, expected_fingerprint=model)
    return FitResult(posterior, metadata)


# --- helpers ----------------------------------------------------------------------------------


def _silent(_line: str) -> None:
    pass


def _unwrap(posterior: Any) -> Posterior:
    posterior = posterior.posterior if isinstance(posterior, FitResult) else posterior
    if not isinstance(posterior, (GaussianPosterior, SamplePosterior)):
        raise ConfigError(f"expected a posterior or a FitResult, got {type(posterior).__name__}")
    return posterior


def _posterior_of(posterior: Any, model: nn.Module) -> Posterior:
    """The posterior to evaluate (a point mass for None), checked against ``model``'s parameters."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    posterior = point_mass(model) if posterior is None else _unwrap(posterior)
    difference = fingerprint_difference(model_fingerprint(model), fingerprint_of_params(posterior.mean()))
    if difference:
        raise ConfigError(f"the posterior does not match the model: {difference}")
    return posterior


def _options(eps: Any, **values: Any) -> EvalOptions:
    if isinstance(eps, (list, tuple)) or (isinstance(eps, (Tensor, np.ndarray)) and eps.ndim):
        raise ConfigError(f"eps must be one radius (a float), got {type(eps).__name__}; call once per radius")
    return EvalOptions(
        eps=[float(eps) if isinstance(eps, (Tensor, np.generic)) else eps], limit=None, **values
    ).validate()


@contextlib.contextmanager
def _evaluation(model: nn.Module, posterior: Posterior, x: Any, y: Any, options: EvalOptions) -> Iterator[tuple]:
    """What :func:`certbnn.evaluation.runner.evaluate_run` sets up before its attacks and certificates:
    device, dtype, ``options.samples`` draws from the ``options.seed`` generator, the predictive,
    and the chunks with their own generators. The model runs in eval mode (restored after)."""
    device = resolve_device(options.device)
    dtype = torch.float64 if options.float64 else torch.float32
    xs, ys = points(x, y)
    placed = _placed(model, device, dtype)
    posterior = posterior.to(device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(options.seed)
    params = mixture_draws(posterior, options.samples, generator)
    xs, ys = xs.to(device=device, dtype=dtype), ys.to(device)
    with _eval_mode(placed):
        with torch.no_grad():
            probs = metrics.predictive_probs(placed, params, xs)[0]
        check_labels(ys.cpu().numpy(), probs.shape[-1], "y")
        yield placed, posterior, params, xs, ys, Chunks(xs, ys, options.seed, None, device, options.chunk_size), probs


def _progress(fn, total: int, desc: str, enabled: bool):
    """``fn`` with a progress bar that advances once per chunk."""
    bar = tqdm(total=total, desc=desc, disable=not enabled, unit="chunk", leave=False)

    def wrapped(*args):
        result = fn(*args)
        bar.update()
        if bar.n >= total:
            bar.close()
        return result

    return wrapped


def _placed(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``model`` itself when its tensors already are on ``device`` in ``dtype``, else a moved copy."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    if all(t.device == device and t.dtype == dtype for t in tensors):
        return model
    return copy.deepcopy(model).to(device=device, dtype=dtype)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _label(model: nn.Module) -> str:
    """The config's ``model`` entry for a module: a label, never a spec or an import path."""
    cls = type(model)
    return f"<{cls.__module__}.{cls.__qualname__} instance>"


def _num_outputs(model: nn.Module, x: np.ndarray) -> int:
    """K of the model's ``(B, K)`` logits on the first example (a one-line error if it fails)."""
    first = next(iter(model.parameters()), None)
    sample = torch.from_numpy(np.ascontiguousarray(x[:1]))
    sample = sample.float() / 255 if sample.dtype == torch.uint8 else sample
    if first is not None:
        sample = sample.to(device=first.device, dtype=first.dtype)
    try:
        with torch.no_grad(), _eval_mode(model):
            out = model(sample)
    except Exception as err:  # noqa: BLE001 -- the user's forward may raise anything: report it in one line
        text = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"model cannot run on train_data's images of shape {tuple(x.shape[1:])}: {text}") from None
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1 or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"model must map (B, C, H, W) images to (B, K) logits with K >= 2, got {shape} for B = 1")
    return int(out.shape[1])
