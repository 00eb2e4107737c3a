"""Run by tests/distributed/test_distributed.py, under torchrun or alone: the jobs of a JSON
file (train or evaluate), in one process group when launched with several processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from certbnn import distributed
from certbnn.config import make_config
from certbnn.evaluation.runner import EvalOptions, evaluate_run
from certbnn.training import train


def main(path: str) -> None:
    jobs = json.loads(Path(path).read_text())
    distributed.init_from_env("cpu")
    try:
        for job in jobs:
            if job["kind"] == "train":
                train(make_config({}, job["config"]), job["out"], progress=False, log=lambda line: None)
            else:
                evaluate_run(job["run"], EvalOptions(**job["options"]), job["out"], progress=False)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
