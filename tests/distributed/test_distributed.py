"""Two-process runs on loopback (gloo, 127.0.0.1): data-parallel training equals one process,
sharded HMC follows the single-process chain, sharded evaluation is identical, a dead rank
fails the job and leaves a checkpoint that resumes with another number of processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from make_datafiles import write_mnist_dir  # noqa: E402

WORKER = Path(__file__).with_name("worker.py")
#: float reduction order differs between 1 and 2 processes; nothing else may
ATOL, RTOL = 2e-5, 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CERTBNN_DIST_TIMEOUT": "60", "PYTHONWARNINGS": "ignore"}


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        *args,
    ]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp-data")
    write_mnist_dir(root / "mnist", counts={"train": 300, "test": 60})
    return root


BASE = {
    "dataset": "mnist",
    "model": "mlp:32",
    "epochs": 2,
    "batch_size": 32,
    "val_size": 40,
    "val_samples": 2,
    "eps": 0.05,
    "test_size": 20,
    "device": "cpu",
    "seed": 3,
}
RUNS = {
    "sgd": {"method": "sgd", "likelihood": "standard", "lr": 0.05},
    "bbb": {"method": "bbb", "likelihood": "ibp", "lr": 0.01, "kl_weight": 0.1},
    "noisy-adam": {
        "method": "noisy-adam",
        "likelihood": "ibp",
        "lr": 0.01,
        "method_options": {"init_precision": 100.0},
    },
    "vogn": {"method": "vogn", "likelihood": "fgsm", "lr": 0.01, "method_options": {"init_precision": 100.0}},
    "swag": {
        "method": "swag",
        "likelihood": "standard",
        "lr": 0.05,
        "method_options": {"snapshot_every": 2, "rank": 2, "num_posterior_samples": 4},
    },
    "sghmc": {"method": "sghmc", "likelihood": "ibp", "lr": 1e-5, "method_options": {"thin": 2}},
    "hmc": {
        "method": "hmc",
        "likelihood": "ibp",
        "epochs": 4,
        "method_options": {"warm_start_epochs": 0, "num_leapfrog": 3, "step_size": 0.002, "temperature": 1.0},
    },
}
EVAL = {
    "eps": [0.02, 0.05],
    "limit": 60,
    "samples": 4,
    "pgd_steps": 3,
    "chunk_size": 16,
    "device": "cpu",
    "certificates": ["per-sample", "paper", "statistical", "decision"],
    "ood_fgsm_eps": 0.3,
    "radius": True,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Every method trained by one process and by two; the one-process BBB run evaluated by both."""
    root = tmp_path_factory.mktemp("ddp")
    for launch in ("single", "double"):
        jobs = [
            {
                "kind": "train",
                "out": str(root / launch / name),
                "config": {**BASE, **settings, "data_dir": str(data_dir)},
            }
            for name, settings in RUNS.items()
        ]
        jobs.append(
            {
                "kind": "evaluate",
                "run": str(root / "single" / "bbb"),
                "out": str(root / launch / "eval"),
                "options": {**EVAL, "data_dir": str(data_dir)},
            }
        )
        (root / f"{launch}.json").write_text(json.dumps(jobs))
        prefix = [sys.executable] if launch == "single" else _torchrun(2)
        _run(prefix + [str(WORKER), str(root / f"{launch}.json")])
    return {"single": root / "single", "double": root / "double"}


def _posterior(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "posterior.safetensors")


@pytest.mark.parametrize("name", [n for n in RUNS if n != "hmc"])
def test_data_parallel_training_equals_one_process(runs, name):
    one, two = _posterior(runs["single"] / name), _posterior(runs["double"] / name)
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=ATOL, rtol=RTOL), (key, (one[key] - two[key]).abs().max())
    history = [json.loads((runs[launch] / name / "metrics.json").read_text())["epochs"] for launch in runs]
    assert [round(e["train_nll"], 4) for e in history[0]] == [round(e["train_nll"], 4) for e in history[1]]


def test_sharded_hmc_follows_the_single_process_chain(runs):
    one, two = _posterior(runs["single"] / "hmc"), _posterior(runs["double"] / "hmc")
    assert one.keys() == two.keys() and any(v.shape[0] == 3 for v in one.values())  # 3 kept samples
    for key in one:
        assert torch.allclose(one[key], two[key], atol=ATOL, rtol=RTOL)
    metrics = [json.loads((runs[launch] / "hmc" / "metrics.json").read_text())["epochs"] for launch in runs]
    assert [e["train_nll"] for e in metrics[0]] == pytest.approx([e["train_nll"] for e in metrics[1]], rel=1e-5)


def test_sharded_evaluation_is_identical(runs):
    one, two = (json.loads((runs[launch] / "eval" / "evaluation.json").read_text()) for launch in runs)
    assert one["processes"] == 1 and two["processes"] == 2
    for key in ("clean", "per_eps", "radius", "ood"):
        assert one[key] == two[key], key


def test_only_rank_zero_writes(runs):
    names = {p.name for p in (runs["double"] / "eval").iterdir()}
    assert names == {p.name for p in (runs["single"] / "eval").iterdir()}


def test_torchrun_cli_trains_like_one_process(tmp_path, data_dir):
    args = [
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        str(data_dir),
        "--model",
        "mlp:16",
        "--method",
        "bbb",
        "--likelihood",
        "ibp",
        "--eps",
        "0.05",
        "--epochs",
        "2",
        "--batch-size",
        "30",
        "--val-size",
        "40",
        "--val-samples",
        "2",
        "--test-size",
        "20",
        "--device",
        "cpu",
        "--lr",
        "0.01",
        "--no-progress",
    ]
    two = _run(_torchrun(2, "-m", "certbnn", *args, "--out", str(tmp_path / "two")))
    assert two.stdout.count("wrote ") == 1  # rank 0 alone reports
    _run([sys.executable, "-m", "certbnn", *args, "--out", str(tmp_path / "one")])
    one, both = _posterior(tmp_path / "one"), _posterior(tmp_path / "two")
    assert all(torch.allclose(one[k], both[k], atol=ATOL, rtol=RTOL) for k in one)
    evaluate = [
        "evaluate",
        "--limit",
        "40",
        "--chunk-size",
        "10",
        "--samples",
        "3",
        "--pgd-steps",
        "2",
        "--certificates",
        "per-sample,paper",
        "--device",
        "cpu",
        "--no-progress",
        "--data-dir",
        str(data_dir),
    ]
    _run(_torchrun(2, "-m", "certbnn", *evaluate, str(tmp_path / "one"), "--out", str(tmp_path / "eval2")))
    _run([sys.executable, "-m", "certbnn", *evaluate, str(tmp_path / "one"), "--out", str(tmp_path / "eval1")])
    sharded, single = (json.loads((tmp_path / name / "evaluation.json").read_text()) for name in ("eval2", "eval1"))
    assert sharded["per_eps"] == single["per_eps"] and sharded["processes"] == 2
    odd = subprocess.run(
        _torchrun(
            2, "-m", "certbnn", *args[:-3], "--batch-size", "31", "--no-progress", "--out", str(tmp_path / "odd")
        ),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert odd.returncode != 0 and "batch size 31 is not divisible by the 2 processes" in odd.stderr


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the worker processes")
def test_a_dead_rank_fails_the_job_and_the_checkpoint_resumes_on_one_process(tmp_path, data_dir):
    args = [
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        str(data_dir),
        "--model",
        "mlp:64",
        "--method",
        "sgd",
        "--likelihood",
        "ibp",
        "--eps",
        "0.05",
        "--epochs",
        "60",
        "--batch-size",
        "20",
        "--val-size",
        "40",
        "--val-samples",
        "1",
        "--test-size",
        "20",
        "--device",
        "cpu",
        "--lr",
        "0.02",
        "--no-progress",
    ]
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        _torchrun(2, "-m", "certbnn", *args, "--out", str(run)),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.safetensors").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, "training never checkpointed"
            time.sleep(0.02)
        workers = _children(launcher.pid)
        assert len(workers) == 2
        os.kill(max(workers), signal.SIGKILL)  # the rank started last
        _, err = launcher.communicate(timeout=120)  # fails, does not hang
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0 and "FAILED" in err
    assert not (run / "posterior.safetensors").exists()
    resumed = _run([sys.executable, "-m", "certbnn", "train", "--resume", "--out", str(run), "--no-progress"])
    assert "resuming" in resumed.stdout
    _run([sys.executable, "-m", "certbnn", *args, "--out", str(tmp_path / "reference")])
    one, two = _posterior(tmp_path / "reference"), _posterior(run)
    assert all(torch.allclose(one[k], two[k], atol=1e-4, rtol=1e-3) for k in one)


def test_independent_chains_pool_samples_and_report_rhat(tmp_path, data_dir):
    config = {**BASE, **RUNS["hmc"], "epochs": 7, "data_dir": str(data_dir), "parallel": "chains"}
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"kind": "train", "out": str(tmp_path / "chains"), "config": config}]))
    _run(_torchrun(2, str(WORKER), str(jobs)))
    jobs.write_text(json.dumps([{"kind": "train", "out": str(tmp_path / "one"), "config": config}]))
    _run([sys.executable, str(WORKER), str(jobs)])
    pooled, single = _posterior(tmp_path / "chains"), _posterior(tmp_path / "one")
    n = next(iter(single.values())).shape[0]  # proposals after the automatic burn-in (eps ramp)
    assert n >= 3
    for key in single:  # chain 0 is the single-process chain; chain 1 is another one of the same length
        assert pooled[key].shape[0] == 2 * single[key].shape[0] == 2 * n
        assert torch.equal(pooled[key][:n], single[key])
        assert not torch.equal(pooled[key][n:], single[key])
    report = json.loads((tmp_path / "chains" / "metrics.json").read_text())["chains"]
    assert report["num_chains"] == 2 and report["samples_per_chain"] == n
    assert report["rhat_max"] > 0.9 and report["ess_min"] > 0
    function = report["function"]  # the same diagnostics of the predictions on validation points
    assert list(function["per_quantity"]) == ["nll"] + [f"logp_{i}" for i in range(8)]
    assert function["rhat_max"] > 0.9 and function["ess_min"] > 0
    assert (tmp_path / "chains" / "checkpoint.rank1.safetensors").exists()
    for items in ("checkpoint.items", "checkpoint.rank1.items"):  # each chain's samples, one file each
        assert len(list((tmp_path / "chains" / items).glob("samples.*.safetensors"))) == n


def test_torchrun_reproduce_runs_a_grid_like_one_process(tmp_path, data_dir):
    preset = tmp_path / "grid.toml"
    preset.write_text("""
[train]
epochs = 2
batch_size = 30
val_size = 40
val_samples = 2
test_size = 20
eps = 0.05
[evaluate]
limit = 40
samples = 3
pgd_steps = 2
chunk_size = 10
certificates = ["per-sample", "paper"]
[methods.sgd]
lr = 0.05
[methods.hmc]
init_from = "cell:sgd"
epochs = 3
method_options = { num_burnin = 1, num_leapfrog = 2, step_size = 0.001 }
[modes.ibp]
likelihood = "ibp"
[[experiment]]
dataset = "mnist"
model = "mlp:16"
methods = ["sgd", "hmc"]
modes = ["ibp"]
""")
    args = ["reproduce", "--preset", str(preset), "--device", "cpu", "--data-dir", str(data_dir), "--no-progress"]
    two = _run(_torchrun(2, "-m", "certbnn", *args, "--out", str(tmp_path / "two")))
    assert two.stdout.count("wrote ") == 1
    _run([sys.executable, "-m", "certbnn", *args, "--out", str(tmp_path / "one")])
    results = [json.loads((tmp_path / name / "results.json").read_text())["cells"] for name in ("one", "two")]
    assert list(results[0]) == list(results[1]) == ["mnist/sgd/ibp", "mnist/hmc/ibp"]
    for cell in results[0]:
        rows = [r[cell]["evaluation"]["per_eps"][0] for r in results]
        assert rows[0]["clean_accuracy"] == pytest.approx(rows[1]["clean_accuracy"], abs=0.03)
    assert all(r[c]["evaluation"]["processes"] == p for r, p in zip(results, (1, 2)) for c in r)
