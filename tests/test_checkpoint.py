"""Checkpoints: the state round-trips, stored samples are written once (a checkpoint costs the new
samples, not all of them), unused item files go, damage and links are refused in one line."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from interrupt import killed_after_epoch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from tinydata import separable_images

from certbnn import data, fileio, training
from certbnn.checkpoint import Checkpoint, CheckpointError, CheckpointStore, items_dir
from certbnn.config import make_config
from certbnn.inference.base import flatten_state
from certbnn.inference.hmc import HMCState
from certbnn.inference.sghmc import SGHMCState


def _params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g)}


def _hmc_state(samples: list[dict[str, torch.Tensor]]) -> HMCState:
    return HMCState(_params(99), torch.tensor(1.5, dtype=torch.float64), _params(98), 1e-3, -6.0, 0.1, 7, 5,
                    samples=samples, sample_eps=[0.1] * len(samples))  # fmt: skip


def _ckpt(state, epoch: int = 1) -> Checkpoint:
    return Checkpoint(state, torch.Generator().manual_seed(epoch).get_state(), epoch, 3 * epoch, [{"epoch": epoch}])


def _item_files(path) -> list[str]:
    return sorted(os.listdir(items_dir(path)))


@pytest.fixture
def writes(monkeypatch):
    """The names of the files written through atomic_write_bytes, in order."""
    names: list[str] = []
    real = fileio.atomic_write_bytes

    def counting(path, data, *args, **kwargs):
        names.append(os.path.basename(path))
        return real(path, data, *args, **kwargs)

    monkeypatch.setattr("certbnn.checkpoint.atomic_write_bytes", counting)
    return names


def test_state_and_samples_round_trip(tmp_path):
    samples = [_params(i) for i in range(4)]
    path = tmp_path / "checkpoint.safetensors"
    CheckpointStore(path).save(_ckpt(_hmc_state(samples), 2), {"seed": 1})
    ckpt, config = CheckpointStore(path).load(HMCState, torch.device("cpu"))
    assert config == {"seed": 1} and (ckpt.epoch, ckpt.step, ckpt.history) == (2, 6, [{"epoch": 2}])
    assert torch.equal(ckpt.rng_state, torch.Generator().manual_seed(2).get_state())
    want, _ = flatten_state(_hmc_state(samples))
    got, _ = flatten_state(ckpt.state)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert ckpt.state.sample_eps == [0.1] * 4 and len(_item_files(path)) == 4


def test_each_sample_is_written_once_and_the_checkpoint_does_not_grow(tmp_path, writes):
    path, store, samples, sizes = tmp_path / "checkpoint.safetensors", None, [], []
    store = CheckpointStore(path)
    for epoch in range(1, 21):
        samples = samples + [_params(epoch)]
        store.save(_ckpt(_hmc_state(samples), epoch), {})
        sizes.append(path.stat().st_size)
    items = [n for n in writes if n != path.name]
    assert len(items) == 20 and len(set(items)) == 20  # 20 samples: 20 item writes, each its own file
    assert writes.count(path.name) == 20
    assert max(sizes) - min(sizes) < 2_000  # the history and the file list grow, the tensors do not


def test_a_resumed_store_reuses_the_files_it_loaded(tmp_path, writes):
    path = tmp_path / "checkpoint.safetensors"
    CheckpointStore(path).save(_ckpt(_hmc_state([_params(0), _params(1)])), {})
    store = CheckpointStore(path)
    ckpt, _ = store.load(HMCState, torch.device("cpu"))
    writes.clear()
    ckpt.state.samples = ckpt.state.samples + [_params(2)]
    store.save(_ckpt(ckpt.state, 2), {})
    assert writes == ["samples.00000002.safetensors", path.name]
    again, _ = CheckpointStore(path).load(HMCState, torch.device("cpu"))
    assert all(torch.equal(again.state.samples[2][k], _params(2)[k]) for k in ("w", "b"))


def test_trimmed_samples_and_what_a_killed_run_left_are_removed(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    store = CheckpointStore(path)
    samples = [_params(i) for i in range(3)]
    store.save(_ckpt(_hmc_state(samples)), {})
    store.save(_ckpt(_hmc_state(samples[1:]), 2), {})  # max_samples dropped the oldest
    assert _item_files(path) == ["samples.00000001.safetensors", "samples.00000002.safetensors"]
    # a killed process: a sample written after its last checkpoint, and a half-written one
    (items_dir(path) / "samples.00000003.safetensors").write_bytes(st_save(_params(77)))
    (items_dir(path) / ".samples.00000004.safetensors.abcd1234.tmp").write_bytes(b"half")
    (items_dir(path) / "notes.txt").write_text("not ours")
    resumed = CheckpointStore(path)
    ckpt, _ = resumed.load(HMCState, torch.device("cpu"))
    resumed.save(_ckpt(dataclasses.replace(ckpt.state, samples=ckpt.state.samples + [_params(5)]), 3), {})
    assert _item_files(path) == [
        "notes.txt",
        "samples.00000001.safetensors",
        "samples.00000002.safetensors",
        "samples.00000004.safetensors",  # numbered after everything there: nothing old is reused
    ]
    final, _ = CheckpointStore(path).load(HMCState, torch.device("cpu"))
    assert torch.equal(final.state.samples[-1]["w"], _params(5)["w"])


def test_a_missing_or_damaged_item_is_a_one_line_error(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    CheckpointStore(path).save(_ckpt(_hmc_state([_params(0), _params(1)])), {})
    item = items_dir(path) / "samples.00000001.safetensors"
    item.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"corrupt checkpoint item") as err:
        CheckpointStore(path).load(HMCState, torch.device("cpu"))
    assert "\n" not in str(err.value)
    item.unlink()
    missing = r"corrupt checkpoint \(item file samples.00000001.safetensors is missing\)"
    with pytest.raises(CheckpointError, match=missing):
        CheckpointStore(path).load(HMCState, torch.device("cpu"))


def test_the_items_folder_is_never_written_through_a_link(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    path = run / "checkpoint.safetensors"
    items_dir(path).symlink_to(foreign, target_is_directory=True)
    with pytest.raises(CheckpointError, match="cannot write checkpoint items .*something else is in the way"):
        CheckpointStore(path).save(_ckpt(_hmc_state([_params(0)])), {})
    assert os.listdir(foreign) == [] and not path.exists()
    CheckpointStore(path).save(_ckpt(SGHMCState(_params(0), _params(1), 4)), {})  # no samples: no folder needed


def test_a_format_1_checkpoint_with_samples_inline_still_loads(tmp_path):
    samples = [_params(i) for i in range(2)]
    tensors, layout = flatten_state(_hmc_state(samples))
    tensors = {f"state/{k}": v for k, v in tensors.items()}
    tensors["rng"] = torch.Generator().get_state()
    meta = {"format_version": 1, "layout": layout, "epoch": 4, "step": 4, "history": [], "config": {}}
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(st_save(tensors, metadata={"certbnn": json.dumps(meta)}))
    store = CheckpointStore(path)
    ckpt, _ = store.load(HMCState, torch.device("cpu"))
    assert ckpt.epoch == 4 and all(torch.equal(a["w"], b["w"]) for a, b in zip(ckpt.state.samples, samples))
    store.save(_ckpt(ckpt.state, 5), {})  # written in the current format from then on
    assert _item_files(path) == ["samples.00000000.safetensors", "samples.00000001.safetensors"]


@pytest.fixture
def tiny():
    images, labels = separable_images()
    data.register_arrays("tiny-ckpt", {"train": (images, labels), "test": (images[:40], labels[:40])}, num_classes=2)
    yield "tiny-ckpt"
    data.unregister("tiny-ckpt")


@pytest.mark.parametrize("method", ["hmc", "sghmc"])
def test_a_sampler_killed_and_resumed_stores_the_uninterrupted_samples(tmp_path, monkeypatch, tiny, method):
    options = {"hmc": {"num_burnin": 1, "num_leapfrog": 3}, "sghmc": {"thin": 2}}[method] | {"max_samples": 3}
    settings = dict(model="mlp:8", likelihood="ibp", eps=0.05, epochs=7, batch_size=32, val_size=40, val_samples=4)
    config = make_config({}, dict(dataset=tiny, method=method, ramp_fraction=0.2, method_options=options, **settings))
    quiet = {"progress": False, "log": lambda s: None}
    training.train(config, tmp_path / "whole", **quiet)
    with killed_after_epoch(monkeypatch, 5):
        training.train(config, tmp_path / "killed", **quiet)
    ckpt = tmp_path / "killed" / training.CHECKPOINT
    state_cls = {"hmc": HMCState, "sghmc": SGHMCState}[method]
    listed = CheckpointStore(ckpt).load(state_cls, torch.device("cpu"))[0].state.samples
    assert len(listed) == 3 and len(_item_files(ckpt)) == 3  # max_samples: the dropped ones are gone
    training.train(config, tmp_path / "killed", resume=True, **quiet)
    whole = load_file(tmp_path / "whole" / training.POSTERIOR)
    resumed = load_file(tmp_path / "killed" / training.POSTERIOR)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert len(_item_files(ckpt)) == 3
