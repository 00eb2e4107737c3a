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
    real_save = training.save_checkpoint

    def save_then_kill(path, ckpt, cfg):
        real_save(path, ckpt, cfg)
        if ckpt.epoch == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_kill)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(training, "save_checkpoint", real_save)
