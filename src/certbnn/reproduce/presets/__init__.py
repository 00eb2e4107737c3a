"""Preset grids shipped with certbnn (TOML files; see certbnn.reproduce.grid)."""
