"""Whole studies as one command: presets (TOML grids of training runs and evaluations),
a resumable grid runner, the RESULTS report, and the demo.

    from certbnn.reproduce import load_preset, run_grid
    preset = load_preset("quick")              # or a path to your own TOML file
    results = run_grid(preset, "runs/quick")   # results.json, RESULTS.md, plots
"""

from certbnn.reproduce.grid import Cell, Preset, list_presets, load_preset, select
from certbnn.reproduce.runner import load_kept_cells, run_grid

__all__ = ["Cell", "Preset", "list_presets", "load_kept_cells", "load_preset", "run_grid", "select"]
