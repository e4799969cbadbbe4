"""The file names of a saved result and of a run directory, spelled once.

`SearchResult.save` writes the first three; ``autoquant run`` writes all of them into its
output directory (plus the rendered report and its plots).
"""

from __future__ import annotations

__all__ = ["CONFIG_FILE", "STATE_FILE", "REPORT_FILE", "JOB_COPY", "JOURNAL_FILE",
           "SENSITIVITY_FILE", "REPORT_MD", "REPORT_HTML", "PLOT_DIR", "ONNX_FILE",
           "RUN_ARTIFACTS"]

CONFIG_FILE = "quant_config.yaml"  # the final QuantConfig (reproduces the plan)
STATE_FILE = "model_state.pt"  # the fake-quant model's state dict (qparams included)
REPORT_FILE = "report.json"  # the search report
JOB_COPY = "job.yaml"  # the resolved job file a run was made from
JOURNAL_FILE = "journal.jsonl"  # every finished evaluation, for --resume
SENSITIVITY_FILE = "sensitivity.json"  # `autoquant sensitivity`'s ranking
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOT_DIR = "plots"
ONNX_FILE = "model_qdq.onnx"  # the job file's export default

# what `autoquant run` writes besides the journal (a folder holding them without a journal
# belongs to another run)
RUN_ARTIFACTS = (REPORT_FILE, CONFIG_FILE, STATE_FILE, JOB_COPY)
