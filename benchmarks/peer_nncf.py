"""The peer's figure on the pretrained encoder: OpenVINO NNCF's post-training quantization of
all-MiniLM-L6-v2 (`benchmarks.encoder`), run in onnxruntime on this CPU and scored by the
same retrieval evaluator as autoquant's calibration benchmark.

NNCF is not a dependency of autoquant: install it beside the ``bench`` extra, best in a
virtual environment that sees the system's packages (NNCF pins its own numpy range)::

    python -m venv --system-site-packages /tmp/nncf && /tmp/nncf/bin/pip install nncf
    /tmp/nncf/bin/python benchmarks/peer_nncf.py

The float encoder is exported at opset 18 (NNCF's ONNX backend writes QuantizeLinear nodes
that onnxruntime refuses at opset 21) with dynamic batch and sequence axes, quantized with
NNCF's ``MIXED`` preset and ``model_type=TRANSFORMER`` on the 128 calibration sentences, and
timed against the float file interleaved (median of `--repeats`, default session options).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per session")
    args = parser.parse_args(argv)
    try:
        import nncf
        import onnx
    except ImportError as err:
        raise SystemExit(f"{err}: this benchmark needs NNCF (pip install nncf)") from err

    from autoquant.export.onnx_export import export_float_onnx
    from autoquant.export.ortmodule import OnnxModule
    from autoquant.export.runtime import interleaved_ms, ort_feed, ort_session
    from autoquant.quant.target import host_target
    from benchmarks.encoder import RetrievalAgreement, minilm_encoder

    model = minilm_encoder()
    evaluator = RetrievalAgreement(model)
    example = evaluator.example_inputs()
    names = ["input_ids", "attention_mask"]
    axes = {name: {0: "batch", 1: "tokens"} for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        float_path = export_float_onnx(model, Path(tmp) / "float.onnx", example, opset=18,
                                       input_names=names, dynamic_axes=axes)
        data = [{names[0]: ids.numpy(), names[1]: mask.numpy()} for ids, mask in
                evaluator.calib]
        start = time.perf_counter()
        quantized = nncf.quantize(onnx.load(str(float_path)), nncf.Dataset(data),
                                  preset=nncf.QuantizationPreset.MIXED,
                                  model_type=nncf.ModelType.TRANSFORMER, subset_size=len(data))
        seconds = time.perf_counter() - start
        int8_path = Path(tmp) / "nncf_int8.onnx"
        onnx.save(quantized, str(int8_path))
        score = evaluator.evaluate(OnnxModule(int8_path, model, example))
        int8, flt = ort_session(int8_path), ort_session(float_path)
        feeds = ort_feed(int8, example), ort_feed(flt, example)
        t_int8, t_float = interleaved_ms([lambda: int8.run(None, feeds[0]),
                                          lambda: flt.run(None, feeds[1])], args.repeats,
                                         warmup=3)
    print(f"NNCF {nncf.__version__} on all-MiniLM-L6-v2, target {host_target()}: full INT8 "
          f"loss {100 - score:.2f} points (metric {score:.2f}), quantize {seconds:.1f} s, "
          f"INT8/float latency {t_int8 / t_float:.2f} ({t_int8:.1f} / {t_float:.1f} ms)")


if __name__ == "__main__":
    main()
