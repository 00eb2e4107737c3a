"""``train(config, run_dir)``: the one entry point that fits a posterior.

Run directory contents (all written atomically):

* ``config.json``: the resolved :class:`~certbnn.config.TrainConfig`;
* ``checkpoint.safetensors``: method state, RNG state and history after each epoch;
  ``checkpoint.items/``: the stored samples of HMC and SG-HMC, each written once
  (:mod:`certbnn.checkpoint`); a chain of ``--parallel chains`` other than the first
  writes ``checkpoint.rank<r>.safetensors`` and ``checkpoint.rank<r>.items/``;
* ``posterior.safetensors``: the final posterior (:mod:`certbnn.posterior` format);
* ``metrics.json``: per-epoch training and validation metrics, and the totals;
* ``.certbnn-run``: the marker (written first) by which certbnn knows the folder is
  its own run: a non-empty folder without it is never written to (:func:`certbnn.fileio.claim_dir`).

Temporary files of an interrupted write (``.<file>.<random>.tmp``) are removed when
a run starts or resumes.

Determinism: the held-out split, the model initialisation and every epoch's
shuffle are functions of ``seed`` (and the epoch), and the training generator's
state is checkpointed, so ``resume=True`` after a kill reproduces the run an
uninterrupted process would have produced.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from certbnn import __version__, data, distributed, strict_json
from certbnn.checkpoint import Checkpoint, CheckpointStore
from certbnn.config import ADVERSARIAL_LIKELIHOODS, ROBUST_LIKELIHOODS, SAVED_DEFAULTS, TrainConfig
from certbnn.data.augment import augment
from certbnn.denormals import flush_denormals
from certbnn.errors import CertbnnError, ConfigError
from certbnn.fileio import RUN_MARKER, atomic_write_text, check_output_dir, claim_dir, is_claimed, remove_stale_temps
from certbnn.functional import detached_params
from certbnn.inference import make_method
from certbnn.inference.diagnostics import AcceptanceTally, chain_summary
from certbnn.likelihoods import BatchNLL, make_likelihood
from certbnn.models import build_model
from certbnn.posterior import load_posterior, save_posterior
from certbnn.priors import prior_from_model
from certbnn.provenance import code_version, machine_info
from certbnn.schedules import LinearRamp, LRFactor, epoch_ramp, on_ramp
from certbnn.validation import validate

PROBE_POINTS = 256  # validation points whose predictions the chain diagnostics follow (HMC, several chains)

CHECKPOINT, POSTERIOR, METRICS, CONFIG = (
    "checkpoint.safetensors",
    "posterior.safetensors",
    "metrics.json",
    "config.json",
)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda[:N]`` or ``auto`` (a GPU when present); under torchrun ``cuda`` is this
    process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is available")
    if name == "cuda" and distributed.current() is not None:
        name = f"cuda:{distributed.local_rank()}"
    return torch.device(name)


def split_train_val(config: TrainConfig, epoch: int = 0) -> tuple[data.ArrayDataset, data.ArrayDataset | None]:
    """Seeded held-out split of the training set (``val_size`` examples), then ``augment`` copies
    appended: the same for every epoch, or with ``augment_each_epoch`` drawn afresh for ``epoch``
    (epoch 0 draws the fixed copies; later epochs their own, a function of seed and epoch)."""
    full = data.load(config.dataset, "train", config.data_dir)
    if config.val_size >= len(full):
        raise ConfigError(f"val_size {config.val_size} leaves no training data ({len(full)} examples)")
    order = np.random.default_rng(config.seed).permutation(len(full))
    train_idx = np.sort(order[config.val_size :][: config.limit_train])
    val = full.subset(np.sort(order[: config.val_size])) if config.val_size else None
    seed = config.seed if not (config.augment_each_epoch and epoch) else config.seed * 1_000_003 + epoch
    return augment(full.subset(train_idx), config.augment, seed=seed), val


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Fit ``config.method`` and write the run directory; returns the metrics dict.

    ``model`` (the Python API, :func:`certbnn.fit`): train this module from its current weights
    (moved to the device) instead of building ``config.model``, which is then only its label.

    Under torchrun (see :mod:`certbnn.distributed`) every rank trains on its shard of
    each global batch; rank 0 alone validates, logs, shows progress and writes files
    (the other ranks return ``{}``).
    """
    run_dir = check_output_dir(run_dir, "run")  # "", "/", files and foreign folders: before any work
    comm = distributed.current()
    main = comm is None or comm.is_main
    progress, log = (progress, log) if main else (False, lambda line: None)
    chains = comm if comm is not None and config.parallel == "chains" else None
    if chains is not None:
        comm = None  # each process runs the whole problem: no sharding, no gradient averaging
    ckpt_path = run_dir / (
        CHECKPOINT if chains is None or chains.is_main else f"checkpoint.rank{chains.rank}.safetensors"
    )
    if resume:
        if not is_claimed(run_dir, "run"):
            raise CertbnnError(f"{run_dir}: nothing to resume (not a certbnn run directory: no {RUN_MARKER})")
        if not ckpt_path.exists():
            raise CertbnnError(f"{run_dir}: nothing to resume (no {ckpt_path.name})")
        if chains is not None and (run_dir / f"checkpoint.rank{chains.world_size}.safetensors").exists():
            raise ConfigError(
                f"{run_dir} holds more chains than the {chains.world_size} processes of this run; "
                "resume with as many processes as it was started with"
            )
    elif ckpt_path.exists() or (run_dir / POSTERIOR).exists():
        raise CertbnnError(f"{run_dir} already holds a run; use --resume to continue it or choose another --out")
    config.validate(check_model=model is None)
    if resume or is_claimed(run_dir, "run"):  # what a killed write left behind (each process: its own files)
        remove_stale_temps(run_dir, [ckpt_path.name] + ([POSTERIOR, METRICS, CONFIG, RUN_MARKER] if main else []))
    device = resolve_device(config.device)
    train_ds, val_ds = split_train_val(config)
    spec = data.get_spec(config.dataset)

    torch.manual_seed(config.seed)  # model initialisation
    model = (build_model(config.model, spec.image_shape, spec.num_classes) if model is None else model).to(device)
    prior = prior_from_model(model, config.prior_scale)
    options = dict(config.method_options)
    if config.lr is not None:
        options["lr"] = config.lr
    if config.kl_weight is not None:  # the posterior temperature, under the method's own option name
        options[temperature_option(config.method)] = config.kl_weight
    method = make_method(config.method, prior=prior, num_data=len(train_ds), **options)
    if chains is not None and config.method not in ("hmc", "sghmc"):
        raise ConfigError(f"parallel = chains needs a sampler (hmc or sghmc), not {config.method}")
    likelihood = make_likelihood(config.likelihood, **_likelihood_options(config, method.full_batch))
    steps_per_epoch = 1 if method.full_batch else train_ds.num_batches(config.batch_size, drop_last=True)
    if steps_per_epoch == 0:
        raise ConfigError(f"batch size {config.batch_size} exceeds the {len(train_ds)} training examples")
    shard = comm.batch_shard(config.batch_size) if comm and not method.full_batch else slice(None)
    schedule = epoch_ramp(
        config.eps,
        config.epochs,
        steps_per_epoch,
        warmup_epochs=config.warmup_epochs,
        ramp_fraction=config.ramp_fraction,
    )
    method = sampler_for_schedule(method, config, schedule, steps_per_epoch, log)
    step_settings = StepSettings.of(config, schedule, config.epochs * steps_per_epoch)

    checkpoints = CheckpointStore(ckpt_path)
    chain_seed = config.seed + (1_000_003 * chains.rank if chains is not None else 0)  # rank 0: the usual chain
    generator = torch.Generator(device=device).manual_seed(chain_seed)
    if resume:
        # the state's class, from a throw-away init (the checkpoint holds its data)
        state_cls = type(method.init(detached_params(model), torch.Generator(device=device).manual_seed(0)))
        ckpt, saved = checkpoints.load(state_cls, device)
        if normalised_config(saved) != normalised_config(config.to_json()):
            raise ConfigError(
                f"{run_dir}: the saved run used a different configuration; resume without changing settings"
            )
        state, start_epoch, step, history = ckpt.state, ckpt.epoch, ckpt.step, ckpt.history
        generator.set_state(ckpt.rng_state)
        log(f"resuming {run_dir} after epoch {start_epoch}")
    else:
        if main:
            claim_dir(run_dir, "run")
            atomic_write_text(run_dir / CONFIG, strict_json.dumps(config.to_json(), indent=2), "config")
        state, start_epoch, step, history = method.init(initial_params(model, config), generator), 0, 0, []
    if chains is not None:
        chains.barrier()  # rank 0 has claimed the run folder before any chain writes its checkpoint there

    full_batch, last_info = None, {}
    if method.full_batch:  # distributed: each rank holds a contiguous share of the data
        full_batch = (train_ds.subset(comm.data_shard(len(train_ds))) if comm else train_ds).tensors(device=device)
    for epoch in range(start_epoch, config.epochs):
        start = time.perf_counter()
        if config.augment_each_epoch and epoch:  # new random copies (full-batch HMC is refused)
            train_ds = split_train_val(config, epoch)[0]
        batches = (
            [full_batch]
            if full_batch is not None
            else train_ds.batches(
                config.batch_size, shuffle=True, seed=config.seed * 1_000_003 + epoch, drop_last=True, device=device
            )
        )
        bar = tqdm(
            batches,
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            leave=False,
            unit="batch",
        )
        loss_sum, seen, tally = 0.0, 0, AcceptanceTally()
        last_accuracy = (
            {"val_acc": f"{history[-1]['val_accuracy']:.3f}"} if history and "val_accuracy" in history[-1] else {}
        )
        for x, y in bar:
            eps = schedule.value(step)
            x, y = x[shard], y[shard]
            nll = BatchNLL(step_settings.likelihood(likelihood, step), model, eps, generator, comm)
            with flush_denormals():  # subnormal gradients slow CPU steps 10x+ (certbnn.denormals)
                state, info = step_settings.method(method, step).step(state, (x, y), nll, generator)
            loss = float(next((info[k] for k in ("nll", "loss", "potential") if k in info), math.nan))
            tally.add(info)
            last_info = info
            if comm:  # the same number on every rank: the global batch mean (or the global potential)
                loss = float(comm.all_reduce(torch.tensor(loss, dtype=torch.float64), "mean"))
            if not math.isfinite(loss):
                raise CertbnnError(
                    f"training diverged: loss {loss} at epoch {epoch + 1}, step {step + 1} "
                    f"(try a smaller learning rate); the last checkpoint in {run_dir} is intact"
                )
            count = len(train_ds) if method.full_batch else config.batch_size  # global, all ranks together
            loss_sum, seen, step = loss_sum + loss * count, seen + count, step + 1
            bar.set_postfix(
                loss=f"{loss:.4f}",
                eps=f"{eps:.4f}",
                **last_accuracy,
                ex_s=f"{seen / (time.perf_counter() - start):.0f}",
            )
        state = method.end_epoch(state, epoch)
        seconds = time.perf_counter() - start
        record = {
            "epoch": epoch + 1,
            "train_nll": loss_sum / max(seen, 1),
            "eps": schedule.value(step - 1),
            **step_settings.record(step - 1),
            **tally.record(),
            "seconds": round(seconds, 3),
            "examples_per_second": round(seen / seconds, 1),
        }
        posterior = _posterior_so_far(method, state) if val_ds is not None and main else None
        if posterior is not None:
            record.update(
                validate(
                    model, posterior, val_ds, record["eps"], num_samples=config.val_samples, seed=config.seed + epoch
                )
            )
        history.append(record)
        if main or chains is not None:
            checkpoints.save(Checkpoint(state, generator.get_state(), epoch + 1, step, history), config.to_json())
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    posterior = method.posterior(state)
    sampling = checked_sampling_metadata(method, state, schedule.target)
    chain = _chain_of(method, posterior, initial_params(model, config), last_info, log)
    chain_report = None
    if chains is not None:
        probe = (val_ds if val_ds is not None else train_ds).subset(slice(0, PROBE_POINTS)).tensors(device=device)
        posterior, chain_report = _pool_chains(chains, posterior, model, probe)
        sampling = {key: [e for chain in chains.gather(sampling) for e in chain[key]] for key in sampling}
    if not main:
        return {}
    test_ds = data.load(config.dataset, "test", config.data_dir) if "test" in spec.splits else None
    if test_ds is not None and config.test_size is not None:
        test_ds = test_ds.subset(slice(0, config.test_size))
    final = dict(history[-1]) if history else {}
    if test_ds is not None:
        final.update(
            validate(model, posterior, test_ds, 0.0, num_samples=config.val_samples, seed=config.seed, prefix="test_")
        )
    metadata = {
        "dataset": config.dataset,
        "preprocessing": "pixels scaled to [0, 1], no normalisation",
        "method": config.method,
        "likelihood": config.likelihood,
        "eps": config.eps,
        "lam": config.lam,
        "seed": config.seed,
        "config": config.to_json(),
        "metrics": final,
        "temperature": posterior_temperature(method),
        "method_settings": method_settings(method),
    }
    metadata.update(sampling)  # sample_eps / snapshot_eps: the radius each sample was drawn at
    save_posterior(run_dir / POSTERIOR, posterior, metadata, model=model, model_spec=config.model)
    seconds = sum(r["seconds"] for r in history)
    metrics = {
        "certbnn_version": __version__,
        "code": code_version(),
        "config": config.to_json(),
        "device": str(device),
        "machine": machine_info(str(device)),
        "num_train": len(train_ds),
        "num_val": len(val_ds) if val_ds is not None else 0,
        "test_accuracy": final.get("test_accuracy"),
        "certified_accuracy_ibp": final.get("certified_accuracy_ibp"),
        "certified_eps": final.get("eps"),
        "temperature": metadata["temperature"],
        "method_settings": metadata["method_settings"],
        **({"chain": chain} if chain else {}),
        **({"chains": chain_report} if chain_report else {}),
        "seconds_per_epoch": round(seconds / max(len(history), 1), 3),
        "examples_per_second": round(len(history) * len(train_ds) / seconds, 1) if seconds else None,
        "epochs": history,
        "final": final,
    }
    atomic_write_text(run_dir / METRICS, strict_json.dumps(metrics, indent=2), "metrics")
    return metrics


@dataclass(frozen=True)
class StepSettings:
    """The settings that change from step to step besides eps: lambda and beta (ramped with
    eps, :func:`certbnn.schedules.on_ramp`) and the learning-rate factor. Each step gets a copy
    of the likelihood / method with its values (``dataclasses.replace``); nothing is copied
    when no schedule is set."""

    lam: LinearRamp | None = None
    beta: LinearRamp | None = None
    lr: LRFactor = LRFactor()

    @classmethod
    def of(cls, config: TrainConfig, eps_ramp: LinearRamp, total_steps: int) -> StepSettings:
        """A cosine lr decays over the steps after the eps ramp (over all steps when the
        likelihood ignores eps)."""
        uses_eps = config.likelihood in ROBUST_LIKELIHOODS + ADVERSARIAL_LIKELIHOODS
        return cls(
            lam=on_ramp(config.lam, config.lam_start, eps_ramp),
            beta=on_ramp(config.beta, config.beta_start, eps_ramp),
            lr=LRFactor(config.resolved_lr_schedule, eps_ramp.first_target_step if uses_eps else 0, total_steps),
        )

    def likelihood(self, likelihood, step: int):
        changes = {k: ramp.value(step) for k, ramp in (("lam", self.lam), ("beta", self.beta)) if ramp is not None}
        return dataclasses.replace(likelihood, **changes) if changes else likelihood

    def method(self, method, step: int):
        factor = self.lr.value(step)
        return method if factor == 1.0 else dataclasses.replace(method, lr=method.lr * factor)

    def record(self, step: int) -> dict[str, float]:
        """What an epoch's history records of the schedules (at its last step)."""
        out = {k: ramp.value(step) for k, ramp in (("lam", self.lam), ("beta", self.beta)) if ramp is not None}
        if self.lr.kind != "constant":
            out["lr_factor"] = self.lr.value(step)
        return out


def sampler_for_schedule(
    method, config: TrainConfig, schedule, steps_per_epoch: int, log: Callable[[str], None] = print
):
    """Samplers (HMC, SG-HMC, SWAG) store samples only once eps has reached its target: an
    automatic burn-in (option unset) is set to end there (logged); explicit settings that
    would store a sample earlier, or none at all, are a ConfigError before any training."""
    if not hasattr(method, "for_schedule"):
        return method
    original = method
    if (
        config.init_from is not None
        and getattr(method, "warm_start_epochs", 0)
        and "warm_start_epochs" not in config.method_options
    ):
        method = dataclasses.replace(method, warm_start_epochs=0)  # the chain starts at --init-from
    context = (
        f"eps {config.eps} after epochs={config.epochs} x {steps_per_epoch} steps/epoch, "
        f"warmup_epochs={config.warmup_epochs}, ramp_fraction={config.ramp_fraction}"
    )
    fitted = method.for_schedule(schedule.first_target_step, config.epochs * steps_per_epoch, steps_per_epoch, context)
    changed = [
        f"{f.name}={getattr(fitted, f.name)}"
        for f in dataclasses.fields(fitted)
        if f.name != "prior" and getattr(fitted, f.name) != getattr(original, f.name)
    ]
    if changed:
        log(
            f"note: {config.method} samples only once eps reaches its target {config.eps} "
            f"(step {schedule.first_target_step + 1}); set {', '.join(changed)}"
        )
    return fitted


def checked_sampling_metadata(method, state, target_eps: float) -> dict[str, list]:
    """The sampler's per-sample eps record (empty for other methods); a CertbnnError if a
    sample was drawn at another radius than the target (the pre-training check prevents it)."""
    if not hasattr(method, "sampling_metadata"):
        return {}
    sampling = method.sampling_metadata(state)
    for key, values in sampling.items():
        off = [e for e in values if e is not None and e != target_eps]
        if off:
            raise CertbnnError(
                f"{method.name}: {len(off)} stored sample(s) were drawn at eps {off[0]}, "
                f"not at the target {target_eps} ({key})"
            )
    return sampling


# The option that sets the temperature T of the tempered posterior p(D|w)^(1/T) p(w) (``kl_weight``
# in the config and on the command line): the VI methods' KL weight, the point estimates' prior weight
# (their objective is then -log of that posterior divided by N / T), the samplers' temperature (their
# potential is (N / T) mean nll - log p(w)).
TEMPERATURE_OPTIONS = {
    "bbb": "kl_weight",
    "noisy-adam": "kl_weight",
    "vogn": "kl_weight",
    "sgd": "prior_weight",
    "adam": "prior_weight",
    "swag": "prior_weight",
    "hmc": "temperature",
    "sghmc": "temperature",
}


def temperature_option(method_name: str) -> str:
    """The option ``config.kl_weight`` sets for ``method_name``; ConfigError for a method without one."""
    from certbnn.inference.base import method_class

    name = method_class(method_name).name
    if name not in TEMPERATURE_OPTIONS:
        raise ConfigError(
            f"kl_weight (the temperature T of p(D|w)^(1/T) p(w)) does not apply to {name}; "
            f"use its own options (--opt KEY=VALUE)"
        )
    return TEMPERATURE_OPTIONS[name]


def posterior_temperature(method) -> dict[str, Any]:
    """What the method targets, for metrics.json and the posterior's metadata: ``temperature`` T,
    the ``option`` holding it and the ``target`` density (T = 1: the Bayesian posterior)."""
    option = TEMPERATURE_OPTIONS.get(method.name)
    if option is not None:
        return {"temperature": float(getattr(method, option)), "option": option, "target": "p(D|w)^(1/T) p(w)"}
    return {"temperature": 1.0, "option": None, "target": "p(D|w) p(w)"}


# Options whose default None is resolved by the method from the data (read off a property).
RESOLVED_DEFAULTS = {"sghmc": {"lr": "learning_rate"}, "hmc": {"step_size": "initial_step_size"}}


def method_settings(method) -> dict[str, Any]:
    """The method's resolved options (its defaults filled in, data-dependent ones such as
    SG-HMC's ``lr`` = 0.1 / N computed), JSON scalars and pairs only."""
    settings = {}
    resolved = RESOLVED_DEFAULTS.get(method.name, {})
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        if value is None and f.name in resolved:
            value = float(getattr(method, resolved[f.name]))
        if isinstance(value, tuple):
            value = list(value)
        if (
            value is None
            or isinstance(value, (bool, int, float, str))
            or (isinstance(value, list) and all(isinstance(v, (int, float)) for v in value))
        ):
            settings[f.name] = value
    return settings


def _chain_of(method, posterior, start, last_info, log: Callable[[str], None]) -> dict[str, Any] | None:
    """A Markov chain's summary (:func:`certbnn.inference.diagnostics.chain_summary`, and the
    acceptance rate of the proposals after burn-in) for the samplers with a Metropolis test
    (HMC); a warning when every stored sample is one network."""
    if method.name != "hmc" or posterior.num_samples < 2:
        return None
    summary = chain_summary(posterior.sample(None), start)
    if "accept_rate" in last_info:
        summary["accept_rate_after_burnin"] = float(last_info["accept_rate"])
    if summary["distinct_samples"] == 1:
        log(
            f"warning: {method.name} rejected every proposal after burn-in: its {summary['stored_samples']} samples "
            "are one network (lower --opt step_size, or burn in longer with adapt_step_size and num_burnin >= 20)"
        )
    return summary


def _pool_chains(comm, posterior, model, probe: tuple[torch.Tensor, torch.Tensor]):
    """Every rank's samples pooled on rank 0 (chain after chain), with R-hat / ESS across chains of
    the weights and of the predictions on ``probe`` (x, y: the first validation points)."""
    from certbnn.inference.diagnostics import chain_diagnostics, predictive_summaries
    from certbnn.posterior import SamplePosterior

    samples = {name: t.cpu() for name, t in posterior.sample(None).items()}
    per_chain = comm.gather(samples)
    if not comm.is_main:
        return posterior, None
    pooled = SamplePosterior({n: torch.cat([c[n] for c in per_chain]) for n in samples})
    x, y = probe

    def predictive(chain: dict[str, torch.Tensor]) -> torch.Tensor:
        return predictive_summaries(model, {n: t.to(x.device) for n, t in chain.items()}, x, y)

    report = (
        chain_diagnostics(per_chain, predictive=predictive)
        if next(iter(samples.values())).shape[0] >= 4
        else {"num_chains": len(per_chain), "note": "fewer than 4 samples per chain: no R-hat / ESS"}
    )
    return pooled.to(device=posterior.reference.device), report


def normalised_config(saved: dict[str, Any]) -> dict[str, Any] | None:
    """A config (saved or wanted) in the form two runs are compared in: fields added since it was
    written at the values that reproduce how it ran (:data:`certbnn.config.SAVED_DEFAULTS`, else
    their defaults), and ``auto`` settings resolved (a run
    saved as ``constant`` is the same run as a sampler's ``auto``). None if it is no config."""
    try:
        config = TrainConfig(**{**SAVED_DEFAULTS, **saved})
    except TypeError:
        return None
    return {**config.to_json(), "lr_schedule": config.resolved_lr_schedule}


def initial_params(model, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The model's own initialisation, or the mean of ``config.init_from`` (a warm start)."""
    if config.init_from is None:
        return detached_params(model)
    path = Path(config.init_from)
    posterior, _ = load_posterior(path / POSTERIOR if path.is_dir() else path, expected_fingerprint=model)
    device = next(model.parameters()).device
    return {name: tensor.detach().clone().to(device) for name, tensor in posterior.mean().items()}


def _likelihood_options(config: TrainConfig, full_batch: bool = False) -> dict[str, Any]:
    options = dict(config.likelihood_options)
    if full_batch and config.likelihood == "pgd":
        # HMC's potential must be a function of the weights alone: no random PGD start
        options.setdefault("random_start", False)
    if config.likelihood in ("ibp", "crown-ibp", "crown", "fgsm", "pgd"):
        options.setdefault("lam", config.lam)
        options.setdefault("mix", config.mix)
    if config.likelihood in ("ibp", "crown-ibp", "crown"):
        options.setdefault("margins", config.margins)
    if config.likelihood == "crown-ibp":
        options.setdefault("beta", config.beta)
    return options


def _posterior_so_far(method, state):
    try:
        return method.posterior(state)
    except CertbnnError:
        return None  # e.g. SWAG before its first snapshot, HMC during burn-in
