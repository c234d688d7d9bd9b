"""Experiments: typed config, the run lifecycle, sweeps, comparisons and analysis over MLflow runs."""
