"""Sensitivity: how much each layer's quantization disturbs its output, measured in one
streaming pass over the calibration batches (cosine, MSE, KL, or a registered metric), as
the ranking the search bisects."""
