"""Batch jobs: the YAML job file and its schema, the ``autoquant`` command line, the
resumable journal of evaluations, the run directory, progress bars."""
