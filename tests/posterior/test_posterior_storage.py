"""Saving/loading posteriors: exact round trips, clear errors, atomic writes."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from certbnn import __version__
from certbnn.errors import CertbnnError, ConfigError
from certbnn.models import build_model, model_fingerprint
from certbnn.posterior import (
    FORMAT_VERSION,
    GaussianPosterior,
    PosteriorFileError,
    SamplePosterior,
    load_posterior,
    save_posterior,
    storage,
)

SPEC, SHAPE = "mlp:6", (1, 3, 3)


def model_and_gaussian(dtype):
    torch.manual_seed(0)
    model = build_model(SPEC, SHAPE, 4).to(dtype)
    mean = {n: p.detach().clone() for n, p in model.named_parameters()}
    std = {n: torch.rand_like(p) + 1e-3 for n, p in mean.items()}
    return model, GaussianPosterior(mean, std)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_round_trip_is_exact(tmp_path, dtype):
    model, posterior = model_and_gaussian(dtype)
    path = tmp_path / "post.safetensors"
    extra = {
        "dataset": "mnist",
        "method": "bbb",
        "eps": 0.1,
        "seed": 3,
        "metrics": {"acc": 0.97, "ece": None},
        "preprocessing": ["to_unit_interval"],
        "likelihood": {"mix": "prob", "lambda": 0.25},
    }
    save_posterior(path, posterior, extra, model=model, model_spec=SPEC)
    loaded, meta = load_posterior(path, expected_fingerprint=model)
    assert isinstance(loaded, GaussianPosterior) and loaded.names == posterior.names
    for name in posterior.names:
        assert loaded.mean()[name].dtype == dtype and torch.equal(loaded.mean()[name], posterior.mean()[name])
        assert torch.equal(loaded.std()[name], posterior.std()[name])
    assert {k: meta[k] for k in extra} == extra
    assert meta["format_version"] == FORMAT_VERSION == 1 and meta["kind"] == "gaussian"
    assert meta["certbnn_version"] == __version__
    assert meta["architecture"] == {"spec": SPEC, "fingerprint": model_fingerprint(model)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 2.0, 0.0])])
def test_sample_round_trip_is_exact(tmp_path, dtype, weights):
    model, gaussian = model_and_gaussian(dtype)
    posterior = SamplePosterior(gaussian.sample(3), weights)
    path = tmp_path / "samples.safetensors"
    save_posterior(path, posterior, {"method": "hmc"}, model_spec=SPEC)
    loaded, meta = load_posterior(str(path), expected_fingerprint=model_fingerprint(model))
    assert isinstance(loaded, SamplePosterior) and meta["kind"] == "samples" and loaded.num_samples == 3
    for name, values in posterior.sample(None).items():
        assert torch.equal(loaded.sample(None)[name], values) and values.dtype == dtype
    if weights is None:
        assert loaded.weights is None
    else:
        assert torch.equal(loaded.frequencies, weights) and torch.equal(loaded.weights, posterior.weights)
    # Loaded metadata can be passed straight back to save_posterior.
    save_posterior(path, loaded, meta)
    assert load_posterior(path)[1]["architecture"]["spec"] == SPEC


def test_architecture_mismatch_names_first_differing_parameter(tmp_path):
    model, posterior = model_and_gaussian(torch.float32)
    save_posterior(tmp_path / "p.safetensors", posterior, model=model, model_spec=SPEC)
    wider = build_model("mlp:7", SHAPE, 4)
    with pytest.raises(ConfigError, match=r"p\.safetensors.*'1\.weight' has shape \(6, 9\), expected \(7, 9\)"):
        load_posterior(tmp_path / "p.safetensors", expected_fingerprint=wider)
    deeper = build_model("mlp:6,5", SHAPE, 4)
    with pytest.raises(ConfigError, match="'3.weight'"):
        load_posterior(tmp_path / "p.safetensors", expected_fingerprint=model_fingerprint(deeper))
    with pytest.raises(ConfigError, match="does not match the model"):
        save_posterior(tmp_path / "q.safetensors", posterior, model=wider)


def rewrite_metadata(path, change):
    """Re-save ``path`` with its certbnn metadata JSON passed through ``change``."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    meta = json.loads(json.loads(data[8 : 8 + size])["__metadata__"]["certbnn"])
    tensors = load_safetensors_bytes(data)
    save_file(tensors, str(path), metadata={"certbnn": json.dumps(change(meta))})


def test_future_format_version_is_a_clear_error(tmp_path):
    _, posterior = model_and_gaussian(torch.float32)
    path = tmp_path / "future.safetensors"
    save_posterior(path, posterior)
    rewrite_metadata(path, lambda meta: {**meta, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(PosteriorFileError) as info:
        load_posterior(path)
    message = str(info.value)
    assert str(path) in message and "version 2" in message and "up to 1" in message and "\n" not in message


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "header", "flipped_header"])
def test_corrupt_files_give_one_line_errors_naming_the_file(tmp_path, damage):
    _, posterior = model_and_gaussian(torch.float32)
    path = tmp_path / "bad.safetensors"
    save_posterior(path, posterior)
    data = path.read_bytes()
    damaged = {
        "empty": b"",
        "truncated": data[: len(data) - 10],
        "garbage": os.urandom(200),
        "header": data[:40],
        "flipped_header": data[:8] + b"}" + data[9:],
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(CertbnnError) as info:
        load_posterior(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_foreign_safetensors(tmp_path):
    with pytest.raises(PosteriorFileError, match="cannot read posterior file .*nope"):
        load_posterior(tmp_path / "nope.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(PosteriorFileError, match="without certbnn posterior metadata"):
        load_posterior(tmp_path / "other.safetensors")


def test_inconsistent_metadata_is_detected(tmp_path):
    _, posterior = model_and_gaussian(torch.float32)
    path = tmp_path / "p.safetensors"
    save_posterior(path, posterior)
    rewrite_metadata(path, lambda meta: {**meta, "kind": "samples"})
    with pytest.raises(PosteriorFileError, match="inconsistent"):
        load_posterior(path)
    save_posterior(path, posterior)
    rewrite_metadata(path, lambda meta: {**meta, "architecture": {"spec": None}})
    with pytest.raises(PosteriorFileError, match="corrupt architecture"):
        load_posterior(path)


def test_nan_values_are_rejected_on_save_and_on_load(tmp_path):
    _, posterior = model_and_gaussian(torch.float32)
    path = tmp_path / "nan.safetensors"
    save_posterior(path, posterior)
    meta_text = json.dumps(load_posterior(path)[1])
    tensors = {f"mean/{n}": t.clone() for n, t in posterior.mean().items()}
    tensors.update({f"std/{n}": t.clone() for n, t in posterior.std().items()})
    tensors["mean/1.bias"][2] = float("nan")
    save_file(tensors, str(path), metadata={"certbnn": meta_text})
    with pytest.raises(PosteriorFileError, match=r"nan\.safetensors.*mean\['1\.bias'\].*NaN"):
        load_posterior(path)
    posterior.mean()["3.weight"][0, 0] = float("inf")  # mutated after construction
    with pytest.raises(PosteriorFileError, match="refusing to save"):
        save_posterior(tmp_path / "inf.safetensors", posterior)
    assert not (tmp_path / "inf.safetensors").exists()


def test_failed_save_never_clobbers_an_existing_file(tmp_path, monkeypatch):
    _, posterior = model_and_gaussian(torch.float32)
    path = tmp_path / "keep.safetensors"
    save_posterior(path, posterior, {"run": 1})
    original = path.read_bytes()
    with pytest.raises(ConfigError, match="not JSON-serializable"):
        save_posterior(path, posterior, {"run": object()})

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", broken)
    with pytest.raises(PosteriorFileError, match="No space left"):
        save_posterior(path, posterior, {"run": 2})
    monkeypatch.undo()
    monkeypatch.setattr(storage, "_st_save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        save_posterior(path, posterior, {"run": 3})
    monkeypatch.undo()
    assert path.read_bytes() == original and sorted(os.listdir(tmp_path)) == ["keep.safetensors"]
    assert load_posterior(path)[1]["run"] == 1


def test_metadata_accepts_numpy_and_tensor_scalars(tmp_path):
    numpy = pytest.importorskip("numpy")
    _, posterior = model_and_gaussian(torch.float32)
    save_posterior(
        tmp_path / "p.safetensors",
        posterior,
        {"acc": numpy.float32(0.5), "eps": torch.tensor(0.25), "path": tmp_path / "data"},
    )
    meta = load_posterior(tmp_path / "p.safetensors")[1]
    assert meta["acc"] == 0.5 and meta["eps"] == 0.25 and meta["path"] == str(tmp_path / "data")


def test_sample_eps_round_trips_and_must_match_the_samples(tmp_path):
    _, gaussian = model_and_gaussian(torch.float32)
    samples = SamplePosterior({n: torch.stack([m, m + 1, m + 2]) for n, m in gaussian.mean().items()})
    path = tmp_path / "p.safetensors"
    save_posterior(path, samples, {"sample_eps": [0.11, 0.11, 0.11], "snapshot_eps": [0.1, 0.11]})
    _, meta = load_posterior(path)
    assert meta["sample_eps"] == [0.11] * 3 and meta["snapshot_eps"] == [0.1, 0.11]
    assert meta["format_version"] == FORMAT_VERSION == 1  # an optional field: older readers ignore it
    for bad, match in (
        ([0.11, 0.11], "2 entries for 3 stored samples"),
        ([0.1, -1.0, 0.1], "non-negative finite"),
        ("0.11", "non-negative finite"),
    ):
        with pytest.raises(ConfigError, match=match):
            save_posterior(tmp_path / "bad.safetensors", samples, {"sample_eps": bad})
        rewrite_metadata(path, lambda meta: {**meta, "sample_eps": bad})
        with pytest.raises(PosteriorFileError, match=match):
            load_posterior(path)
    with pytest.raises(ConfigError, match="1 entries for no stored samples"):
        save_posterior(tmp_path / "g.safetensors", gaussian, {"sample_eps": [0.1]})
