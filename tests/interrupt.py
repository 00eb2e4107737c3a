"""Simulated kills of a training run, for the resume tests."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from certbnn import training


@contextmanager
def killed_after_epoch(monkeypatch, epoch: int = 2):
    """Inside the block, training is killed (KeyboardInterrupt) right after it has written the
    checkpoint of ``epoch``; the block must end that way. The real checkpoint writer is back
    afterwards, so the run can then be resumed."""
    real_save = training.CheckpointStore.save

    def save_then_kill(store, ckpt, cfg):
        real_save(store, ckpt, cfg)
        if ckpt.epoch == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.CheckpointStore, "save", save_then_kill)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(training.CheckpointStore, "save", real_save)
