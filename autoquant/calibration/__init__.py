"""Calibration, run once per search: SmoothQuant-style smoothing, the observer pass, the
per-layer automatic choice of the activation calibration and bias correction."""
