"""Shared test helpers: tiny models, evaluators with known answers, fake-quant references,
the onnxruntime parity check, and the modules job files in the tests import."""
