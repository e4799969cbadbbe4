"""Batch jobs: one YAML file describes a whole search (model, evaluator, inputs, config, search).

`load_job` parses the file safely (no aliases), validates every key before anything runs and
returns a `Job` that builds the pieces. Every error names the file, the line, the key and
the valid choices. Relative paths resolve against the YAML file's folder. The schema::

    version: 1                      # optional
    python_path: [.]                # optional; folders put on sys.path (relative to the file)
    seed: 0                         # optional; seeds model init and example inputs
    model:                          # or just "package.module:factory"
      factory: package.module:build_model
      kwargs: {}
      checkpoint: weights.pt        # optional; torch.load(weights_only=True) + load_state_dict
    evaluator:                      # or just "package.module:MyEvaluator"
      class: package.module:MyEvaluator
      kwargs: {}
    example_inputs:                 # optional: a list of tensor specs ...
      - {shape: [1, 3, 32, 32], dtype: float32}
    # example_inputs: {factory: package.module:make_inputs, kwargs: {}}   # ... or a function
    quant: {default: {weight: {bits: 4}}}   # inline QuantConfig, or a path (init-config)
    search:                         # autoquant.SearchSettings, key for key
      strategy: binary
      strategy_options: {}          # checked against the strategy's constructor
      sensitivity: cosine
      max_loss: 0.01
      loss_type: absolute           # or relative
      max_evaluations: null         # a budget, the float baseline included
      eval_timeout: null            # seconds one evaluate() may take (null: no limit)
      max_seconds: null             # wall-time budget of the run (null: no limit)
      workers: 1                    # evaluate independent plans in parallel processes
      executor: null                # or "dask://HOST:PORT": trials on a Dask cluster
      holdout: null                 # re-check the final plan on evaluate_holdout()
      audit: 0                      # audit the ranking on this many layers
      check_determinism: false      # evaluate the float model twice and compare
      verify_deploy: false          # score the exported model with the evaluator before
                                    # the search reports "met" (one evaluation per check)
    export:                         # optional: export the result to ONNX after the search
      path: model_qdq.onnx          # relative to the output directory
      opset: null                   # default 21
      input_names: [images]         # optional, as torch.onnx.export takes them
      output_names: [logits]
      dynamic_axes: {images: {0: batch, 2: height, 3: width}}   # default: the batch axis
      strict: true                  # a failed parity check in onnxruntime is an error
    output_dir: out                 # optional (default "autoquant_out")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from autoquant.errors import ConfigError, ModelError
from autoquant.io.atomic import atomic_write_text
from autoquant.io.reading import parse_json, read_text_file
from autoquant.io.yamlsafe import load_yaml_with_lines, safe_load_no_aliases
from autoquant.jobs.schema import (
    DTYPES,
    JOB_VERSION,
    JobConfig,
    quant_config_from_data,
    validate_job,
)

__all__ = ["Job", "JobConfig", "load_job", "JOB_VERSION", "DTYPES", "MAX_QUANT_BYTES"]

# a per-layer config (`autoquant init-config`) of a 10,000-layer model is a few MiB
MAX_QUANT_BYTES = 64 << 20


class Job:
    """A loaded job: builds the model, evaluator, example inputs and quant config.

    Example:
        >>> job = load_job("job.yaml")
        >>> model, evaluator = job.build_model(), job.build_evaluator()
        >>> result = autoquant.auto_quantize(model, evaluator, job.example_inputs(),
        ...                                  job.settings(), config=job.quant_config())
    """

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.path = config.path

    def _import(self, path: str, what: str) -> Any:
        from autoquant.registry import import_object

        return import_object(path, what)

    def build_model(self) -> Any:
        """Call the model factory (after seeding torch) and load the checkpoint, if any."""
        import torch
        from torch import nn

        from autoquant.io.checkpoint import load_state_dict_file
        from autoquant.quant.copying import check_model_devices

        spec = self.config.model
        torch.manual_seed(self.config.seed)
        factory = self._import(spec["factory"], "model factory")
        try:
            model = factory(**spec["kwargs"])
        except Exception as err:
            raise ModelError(f"{self.path}: model factory {spec['factory']!r} raised "
                             f"{type(err).__name__}: {err}") from err
        if not isinstance(model, nn.Module):
            raise ModelError(f"{self.path}: model factory {spec['factory']!r} returned "
                             f"{type(model).__name__}; it must return a torch.nn.Module")
        if spec.get("checkpoint") is not None:
            state = load_state_dict_file(spec["checkpoint"], f"{self.path}: checkpoint")
            try:
                model.load_state_dict(state)
            except (RuntimeError, ValueError, TypeError) as err:
                raise ModelError(f"{self.path}: cannot load checkpoint "
                                 f"{str(spec['checkpoint'])!r} into the model: {err}") from err
        check_model_devices(model)
        return model.eval()

    def build_evaluator(self) -> Any:
        """Instantiate the evaluator class with its kwargs."""
        spec = self.config.evaluator
        cls = self._import(spec["class"], "evaluator")
        try:
            return cls(**spec["kwargs"])
        except Exception as err:
            raise ConfigError(f"{self.path}: evaluator {spec['class']!r} could not be built "
                              f"from kwargs {spec['kwargs']!r}: {type(err).__name__}: "
                              f"{err}") from err

    def example_inputs(self) -> Any:
        """The example inputs: seeded tensors from the specs, the factory's value, or None.

        Floating tensors are uniform in [0, 1); integer and bool tensors are zeros.
        """
        import torch

        spec = self.config.example_inputs
        if spec is None:
            return None
        if isinstance(spec, dict):
            factory = self._import(spec["factory"], "example_inputs factory")
            try:
                return factory(**spec["kwargs"])
            except Exception as err:
                raise ConfigError(f"{self.path}: example_inputs factory {spec['factory']!r} "
                                  f"raised {type(err).__name__}: {err}") from err
        gen = torch.Generator().manual_seed(self.config.seed)
        tensors = []
        for item in spec:
            dtype = getattr(torch, item["dtype"])
            if dtype.is_floating_point:
                tensors.append(torch.rand(item["shape"], generator=gen).to(dtype))
            else:
                tensors.append(torch.zeros(item["shape"], dtype=dtype))
        return tuple(tensors)

    def quant_config(self) -> Any:
        """The `QuantConfig`: inline, from the file `quant` names, or the int8 default."""
        from autoquant.config import QuantConfig

        quant = self.config.quant
        if quant is None:
            return QuantConfig()
        if isinstance(quant, Path):
            if not quant.is_file():
                raise ConfigError(
                    f"{self.path}: quant: file {str(quant)!r} does not exist; create it with "
                    f"`autoquant init-config {self.path}` or put the config inline"
                )
            return _load_quant_file(quant)
        return quant_config_from_data(quant)

    def settings(self) -> Any:
        """The `SearchSettings` of the ``search:`` section (the deploy check exports with
        the ``export:`` section's options)."""
        from autoquant.settings import SearchSettings

        data = dict(self.config.search)
        if not data.get("deploy_options"):
            data["deploy_options"] = self.export_options()
        return SearchSettings.from_dict(data)

    def export_options(self) -> dict[str, Any]:
        """`autoquant.export.onnx_export.export_onnx` keyword options of the ``export`` section."""
        spec = self.config.export or {}
        return {k: spec[k] for k in ("opset", "input_names", "output_names", "dynamic_axes")
                if spec.get(k) is not None}

    def resolved(self) -> dict[str, Any]:
        """The job with absolute paths and the quant config inlined (for ``job.yaml``)."""
        data = self.config.to_dict()
        data["quant"] = self.quant_config().to_dict()
        return data

    def save(self, path: str | Path) -> Path:
        """Write the resolved job atomically; `load_job` reads it back anywhere."""
        text = ("# autoquant job, resolved (absolute paths, quant config inlined)\n"
                + yaml.safe_dump(self.resolved(), sort_keys=False))
        return atomic_write_text(path, text)


def _load_quant_file(path: Path) -> Any:
    """The `QuantConfig` of the file `path` (JSON by extension, else YAML), read like a job
    file: size-limited, UTF-8 with a clear error, no aliases, bounded nesting."""
    text = read_text_file(path, "quant config", max_bytes=MAX_QUANT_BYTES)
    try:
        if path.suffix.lower() == ".json":
            data = parse_json(text, path, "quant config")
        else:
            data = safe_load_no_aliases(text)
        return quant_config_from_data(data)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: quant config is not valid YAML: {err}") from err
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}"
                          ) from None


def load_job(path: str | Path) -> Job:
    """Load and validate the job file `path`; nothing heavy runs yet.

    Adds ``python_path`` folders, and the closest folder above the file that holds each
    import path's top package, to ``sys.path`` so the factories resolve.

    Raises:
        ConfigError: naming the file, the line, the key and the valid choices.
    """
    path = Path(path).expanduser().resolve()
    data, lines = load_yaml_with_lines(path)
    if data is None:
        raise ConfigError(f"{path} is empty; a job needs at least model, evaluator and search")
    return Job(validate_job(path, data, lines))
