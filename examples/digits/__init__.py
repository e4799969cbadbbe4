"""Digits example: a small CNN on scikit-learn's 8x8 digits, trained then auto-quantized."""
