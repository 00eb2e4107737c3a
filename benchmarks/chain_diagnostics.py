"""Weight- and function-space R-hat / ESS of a finished multi-chain HMC run, e.g. one made before
``certbnn train --parallel chains`` recorded the function-space diagnostics.

    CERTBNN_DATA=../shared/data .venv/bin/python benchmarks/chain_diagnostics.py RUN_DIR [RUN_DIR ...]

RUN_DIR holds the pooled ``posterior.safetensors`` (chain after chain, equal lengths) and
``metrics.json`` (``chains.num_chains``). The function-space quantities are those of
:func:`certbnn.inference.diagnostics.predictive_summaries` on the first 256 TEST points (training
records them on the first 256 validation points).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from certbnn import data
from certbnn.inference.diagnostics import chain_diagnostics, predictive_summaries
from certbnn.models import build_model
from certbnn.posterior import load_posterior
from certbnn.training import PROBE_POINTS


def span(report: dict) -> str:
    rhats = [q["rhat"] for q in report["per_quantity"].values()]
    return f"R-hat {min(rhats):.2f}-{max(rhats):.2f}, ESS min {report['ess_min']:.1f}"


def main() -> None:
    for run in map(Path, sys.argv[1:]):
        metrics = json.loads((run / "metrics.json").read_text())
        config, chains = metrics["config"], metrics["chains"]["num_chains"]
        samples = load_posterior(run / "posterior.safetensors")[0].sample(None)
        length = next(iter(samples.values())).shape[0] // chains
        per_chain = [{n: t[c * length : (c + 1) * length] for n, t in samples.items()} for c in range(chains)]
        x, y = data.load(config["dataset"], "test").subset(slice(0, PROBE_POINTS)).tensors()
        model = build_model(config["model"], tuple(x.shape[1:]), int(y.max()) + 1)
        report = chain_diagnostics(per_chain, predictive=lambda chain: predictive_summaries(model, chain, x, y))
        nll = report["function"]["per_quantity"]["nll"]
        print(
            f"{run}: {chains} chains x {length}; weights {span(report)}; function {span(report['function'])}; "
            f"probe NLL R-hat {nll['rhat']:.2f}, ESS {nll['ess']:.1f}"
        )


if __name__ == "__main__":
    main()
