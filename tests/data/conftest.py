"""Fixtures shared by the data tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def isolated_roots(tmp_path, monkeypatch):
    """No real data in sight: empty CERTBNN_DATA, cache and system roots."""
    from certbnn.data import roots

    empty = tmp_path / "nothing"
    monkeypatch.setenv("CERTBNN_DATA", str(tmp_path / "env-root"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(roots, "SYSTEM_ROOTS", (empty,))
    return tmp_path
