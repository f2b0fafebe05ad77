"""Experiments over many runs: grids, sweeps, the papers' protocols, reports and significance tests."""
