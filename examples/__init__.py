"""Runnable autoquant examples (importable as a package for the tests)."""
