"""Human-readable reports: ``report.md`` and a self-contained ``report.html`` with plots.

Both render the data of ``report.json`` (see `autoquant.report.build`): a ten-second summary (met
or not, loss vs budget, layers quantized k/N, evaluations, time), a bar chart of per-layer
sensitivity with fallback layers marked, the search trajectory (metric against the number of
fallback layers, with the threshold line), and the per-layer table. Plots use matplotlib's
Agg backend (the ``report`` extra); without matplotlib the reports have no plots.

Every string of the report (layer names, labels, the reason, the environment) is text, never
markup: HTML-escaped in ``report.html``, escaped for Markdown in ``report.md``, and with
``$`` escaped in plot labels (matplotlib would otherwise parse ``cost$\\foo$`` as mathtext
and fail). ``autoquant report`` checks a ``report.json`` from disk against the schema
before it gets here (`autoquant.report.validate`).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from pathlib import Path
from typing import Any

from autoquant.io.atomic import atomic_write_bytes, atomic_write_text
from autoquant.io.names import PLOT_DIR, REPORT_HTML, REPORT_MD
from autoquant.search.trust import significant_text

__all__ = ["render_report", "plot_sensitivity", "plot_trajectory", "summary_lines",
           "check_lines",
           "threshold_metric", "plot_text", "markdown_text"]

logger = logging.getLogger(__name__)

_STATUS = {"met": "MET", "float_only": "FLOAT ONLY", "not_met": "NOT MET",
           "budget_exhausted": "BUDGET EXHAUSTED", "interrupted": "INTERRUPTED"}


def _fmt(value: Any, spec: str = ".6g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def plot_text(text: Any) -> str:
    """`text` as a matplotlib label that is shown as written: ``$`` escaped, so a layer
    named ``cost$\\foo$`` is not parsed as (invalid) mathtext."""
    return str(text).replace("$", r"\$")


def markdown_text(text: Any) -> str:
    """`text` for a Markdown page or table cell: HTML special characters escaped (Markdown
    passes raw HTML through) and ``|`` escaped (it would split a table cell)."""
    return html.escape(str(text), quote=False).replace("|", "\\|")


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def threshold_metric(report: dict[str, Any]) -> float | None:
    """The metric value at which the loss equals ``max_loss``, or None if unknown."""
    settings = report.get("settings") or {}
    base = (report.get("metrics") or {}).get("float")
    max_loss = settings.get("max_loss")
    if base is None or max_loss is None or "higher_is_better" not in settings:
        return None
    drop = max_loss if settings.get("loss_type", "absolute") == "absolute" else \
        max_loss * abs(base)
    return base - drop if settings["higher_is_better"] else base + drop


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The summary as plain-text lines (Markdown-safe)."""
    m, c, t = report["metrics"], report["counts"], report.get("timings") or {}
    s = report.get("settings") or {}
    run = report.get("run") or {}
    fallback = _fallback_names(report)
    reused = run.get("reused_evaluations") or 0
    lines = [
        f"**{_STATUS.get(report['status'], report['status'])}**: {report['reason']}",
        f"Loss: {_fmt(m.get('loss'))} (budget {_fmt(s.get('max_loss'))} "
        f"{s.get('loss_type', '')})",
        f"Metric: float {_fmt(m.get('float'))}, all quantized {_fmt(m.get('full_quant'))}, "
        f"final {_fmt(m.get('final'))}",
        f"Layers quantized: {c['quantized']}/{c['layers']} (fell back: "
        f"{', '.join(fallback) or 'none'}; skipped: {c['skipped']})",
        f"Evaluations: {c['evaluations']}" + (f" ({reused} reused from the journal)"
                                              if reused else ""),
        f"Time: {_fmt(t.get('total'), '.1f')} s total, {_fmt(t.get('evaluator'), '.1f')} s "
        "inside the evaluator" + (f" (+{run['reused_evaluator_seconds']:.1f} s in the "
                                  "interrupted run)" if reused and
                                  run.get("reused_evaluator_seconds") else ""),
    ]
    det = report.get("determinism")
    if det and not det.get("deterministic", True):
        lines.append(f"WARNING: the evaluator is not deterministic: the float model scored "
                     f"{_fmt(det.get('first'), '.9g')} then {_fmt(det.get('second'), '.9g')} "
                     f"(difference {_fmt(det.get('difference'), '.3g')})")
    sizes = report.get("sizes")
    if sizes:
        f_b, q_b = sizes.get("float_weight_bytes"), sizes.get("quantized_weight_bytes")
        ratio = f" ({f_b / q_b:.1f}x smaller)" if f_b and q_b else ""
        lines.append(f"Weights: {_bytes(f_b)} float, {_bytes(q_b)} as stored quantized "
                     f"(int8/int16, not bit-packed){ratio}")
        schemes = sizes.get("schemes")
        if schemes:
            lines.append("Schemes: " + ", ".join(f"{n} {s.upper() if s != 'float' else s}"
                                                 for s, n in schemes.items()))
    return lines + check_lines(report) + deployment_lines(report)


def check_lines(report: dict[str, Any]) -> list[str]:
    """The ranking used (metric and scope) with its audit, the held-out and monotonicity
    checks, and where the trials ran."""
    s, checks = report.get("settings") or {}, report.get("checks") or {}
    audit = checks.get("audit")
    scope = s.get('sensitivity_scope', 'layer')
    used = report.get("ranking_scope") or []
    if scope == "auto" and len(used) == 1:
        scope = f"auto: {used[0]}"
    ranking = (f"Ranking: {markdown_text(s.get('sensitivity', 'n/a'))}, "
               f"{markdown_text(scope)} scope")
    if audit:
        ranking += (f"; audit of {len(audit.get('layers') or [])} layer(s) alone quantized: "
                    f"Spearman rho {_fmt(audit.get('spearman_rho'), '.2f')} against their "
                    "measured loss" + ("" if audit.get("complete", True) else
                                       " (stopped early: budget)") + significant_text(audit))
    else:
        ranking += " (not audited: set audit=K to measure how well it predicts the metric)"
    lines = [ranking]
    holdout = checks.get("holdout")
    if holdout:
        lines.append(f"Held-out check: float {_fmt(holdout.get('float_metric'))}, final "
                     f"{_fmt(holdout.get('metric'))}, loss {_fmt(holdout.get('loss'))} "
                     f"({'pass' if holdout.get('passed') else 'FAIL'})")
    if checks.get("monotonicity"):
        lines.append(f"Monotonicity violations: {len(checks['monotonicity'])} (a pass at k "
                     "and a fail at more fallbacks: the ranking misleads)")
    for idle in (checks.get("idle_fallbacks") or [])[:5]:
        lines.append(f"Falling back {markdown_text(', '.join(idle.get('layers') or []))} "
                     f"(k {idle.get('from_k')} to {idle.get('to_k')}) did not lower the loss "
                     f"({_fmt(idle.get('loss_from'))} to {_fmt(idle.get('loss_to'))}): the "
                     "ranking misleads there")
    for row in (checks.get("disputed_fallbacks") or [])[:5]:
        lines.append(f"{markdown_text(str(row.get('layer')))} fell back, but its own output "
                     f"error ranks it {row.get('local_rank', -2) + 1} (the ranking: "
                     f"{row.get('rank', -2) + 1}; 1 = most sensitive): the measures disagree")
    if checks.get("deploy_error"):
        lines.append(f"Not verified in onnxruntime: {markdown_text(checks['deploy_error'])}")
    if parallel := checks.get("parallel"):
        lines.append(f"Trials ran on {markdown_text(parallel.get('executor'))}, "
                     f"{parallel.get('width')} at a time, on "
                     f"{len(parallel.get('workers') or {})} worker(s)"
                     + (f"; {parallel['requeued']} re-queued after a lost worker"
                        if parallel.get("requeued") else ""))
    return lines


def deployment_lines(report: dict[str, Any]) -> list[str]:
    """The deployed artifact: the target, the metric measured in onnxruntime, the integer
    kernels, and the exported file's size and latency against float."""
    deploy = report.get("deployment") or {}
    figures = deploy.get("export") or {}
    lines = []
    if deploy.get("target"):
        lines.append(f"Deploy target: {deploy['target']}")
    if deploy.get("met_on_deploy") is not None:
        verdict = "meets" if deploy["met_on_deploy"] else "MISSES"
        lines.append(f"Deployed in onnxruntime: metric {_fmt(deploy.get('deployed_metric'))}, "
                     f"loss {_fmt(deploy.get('deployed_loss'))} ({verdict} the budget; "
                     f"{len(deploy.get('checks') or [])} plan(s) checked)")
    kernels = figures.get("integer_kernels")
    if kernels:
        floats = kernels.get("float") or {}
        lines.append(str(kernels.get("summary", "")) + (f" (float: {', '.join(floats)})"
                                                        if floats else ""))
    if figures.get("latency_ratio") is not None:
        lines.append(f"Exported file: {_bytes(figures.get('file_bytes'))} "
                     f"({_fmt(figures.get('size_ratio'), '.2f')}x float), latency "
                     f"{_fmt(figures.get('onnxruntime_ms'), '.3g')} ms "
                     f"({_fmt(figures.get('latency_ratio'), '.2f')}x float, onnxruntime)")
    return lines


def _fallback_names(report: dict[str, Any]) -> list[str]:
    return list(report.get("fallback_layers") or [])


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed (pip install autoquant[report]); the "
                       "reports have no plots")
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_sensitivity(report: dict[str, Any]) -> bytes | None:
    """PNG: one bar per ranked layer, ``1 - score`` on a log axis, fallback layers red."""
    rows = [r for r in report["layers"] if r.get("rank") is not None and r.get("score")
            is not None and math.isfinite(r["score"])]
    plt = _pyplot()
    if plt is None or not rows:
        return None
    rows.sort(key=lambda r: r["rank"])
    fallback = set(_fallback_names(report))
    values = [max(1.0 - r["score"], 1e-12) for r in rows]
    colors = ["#d62728" if r["name"] in fallback else "#1f77b4" for r in rows]
    height = max(2.5, 0.28 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(8, min(height, 40)))
    y = list(range(len(rows)))
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, [plot_text(r["name"]) for r in rows],
                  fontsize=8 if len(rows) < 40 else 6)
    ax.invert_yaxis()
    if max(values) / min(values) > 20:
        ax.set_xscale("log")
    metric = (report.get("settings") or {}).get("sensitivity", "score")
    ax.set_xlabel(plot_text(f"1 - {metric} score (longer = more sensitive)"))
    ax.set_title("Per-layer sensitivity (most sensitive first)")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#d62728", label="fell back"),
                       Patch(color="#1f77b4", label="quantized")], loc="lower right",
              fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def plot_trajectory(report: dict[str, Any]) -> bytes | None:
    """PNG: each trial's metric against its number of fallback layers, with thresholds.

    Quantized trials are green (pass) or red (fail) and numbered in evaluation order; the
    float baseline sits at "every layer fell back"; the chosen plan is ringed.
    """
    all_trials = report.get("trials", [])
    trials = [t for t in all_trials if t["label"] != "float"]
    plt = _pyplot()
    if plt is None or not trials:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2))
    xs = [len(t["fallback_layers"]) for t in trials]
    ys = [t["metric"] for t in trials]
    ax.plot(xs, ys, color="#999999", linewidth=1, zorder=1, label="search order")
    for t, x, y in zip(trials, xs, ys, strict=True):
        ax.scatter([x], [y], color="#2ca02c" if t["passed"] else "#d62728", zorder=2, s=40)
        ax.annotate(str(t["index"]), (x, y), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    floats = [t for t in all_trials if t["label"] == "float"]
    for t in floats:
        ax.scatter([len(t["fallback_layers"])], [t["metric"]], marker="s", color="#1f77b4",
                   zorder=2, s=40, label="float baseline")
    chosen = next((t for t in trials if t["plan"] == report.get("plan")), None)
    if chosen is not None:
        ax.scatter([len(chosen["fallback_layers"])], [chosen["metric"]], s=220,
                   facecolors="none", edgecolors="black", linewidths=1.5, zorder=3,
                   label="chosen")
    base = (report.get("metrics") or {}).get("float")
    if base is not None:
        ax.axhline(base, color="#1f77b4", linestyle=":", linewidth=1)
    limit = threshold_metric(report)
    if limit is not None:
        ax.axhline(limit, color="#d62728", linestyle="--", label=f"threshold {limit:.4g}")
    ax.scatter([], [], color="#2ca02c", label="pass")
    ax.scatter([], [], color="#d62728", label="fail")
    ax.set_xlabel("number of fallback layers")
    ax.set_ylabel("metric")
    ax.set_title("Search trajectory (numbers: evaluation order)")
    xmax = max([*xs, *(len(t["fallback_layers"]) for t in floats)])
    ax.set_xlim(-0.5, xmax + 0.5)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


def _table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    fallback = set(_fallback_names(report))
    head = ["rank", "layer", "type", "parameters", "score", "precision", "note"]
    rows = []
    for r in sorted(report["layers"], key=lambda r: (r.get("rank") is None,
                                                       r.get("rank") or 0)):
        note = "skipped" if r.get("skipped") else ("fell back" if r["name"] in fallback
                                                   else "")
        score = r.get("score")
        rows.append([_fmt(r.get("rank")), r["name"], _fmt(r.get("type")),
                     _fmt(r.get("parameters")),
                     "n/a" if score is None or not math.isfinite(score) else f"{score:.6f}",
                     _fmt(r.get("precision")), note])
    return head, rows


_TRIAL_HEAD = ["#", "label", "fallback", "metric", "loss", "pass", "seconds"]


def _trial_cells(t: dict[str, Any]) -> list[str]:
    """One trial as plain-text cells (escape them for the page they go to)."""
    return [_fmt(t["index"]), str(t["label"]), str(len(t["fallback_layers"])),
            _fmt(float(t["metric"])), _fmt(float(t["loss"])), "yes" if t["passed"] else "no",
            _fmt(float(t["seconds"]), ".2f")]


def _markdown(report: dict[str, Any], plots: dict[str, str]) -> str:
    md = markdown_text
    out = ["# autoquant search report", ""]
    out += [f"- {md(line)}" for line in summary_lines(report)] + [""]
    for title, name in (("Sensitivity", "sensitivity"), ("Search trajectory", "trajectory")):
        if name in plots:
            out += [f"## {title}", "", f"![{title}]({plots[name]})", ""]
    head, rows = _table(report)
    out += ["## Layers", "", "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head)]
    out += ["| " + " | ".join(md(cell) for cell in row) + " |" for row in rows]
    out += ["", "## Trials", "", "| " + " | ".join(_TRIAL_HEAD) + " |",
            "|" + "---|" * len(_TRIAL_HEAD)]
    out += ["| " + " | ".join(md(c) for c in _trial_cells(t)) + " |"
            for t in report.get("trials", [])]
    env = report.get("environment") or {}
    out += ["", "Environment: " + md(", ".join(f"{k} {v}" for k, v in env.items())), ""]
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}.met{color:#2ca02c}.fail{color:#d62728}img{max-width:100%}
.summary li{margin:0.2em 0}"""


def _html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    e = html.escape
    status_cls = "met" if report["status"] == "met" else "fail"  # a class name, not text
    items = []
    for line in summary_lines(report):
        text = e(line)
        if text.startswith("**"):
            bold, _, rest = text[2:].partition("**")
            text = f'<b class="{status_cls}">{bold}</b>{rest}'
        items.append(f"<li>{text}</li>")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>autoquant report"
             f"</title><style>{_CSS}</style></head><body><h1>autoquant search report</h1>",
             f"<ul class='summary'>{''.join(items)}</ul>"]
    for title, name in (("Sensitivity", "sensitivity"), ("Search trajectory", "trajectory")):
        if name in images:
            data = base64.b64encode(images[name]).decode("ascii")
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,"
                         f"{data}'>")
    head, rows = _table(report)
    parts.append("<h2>Layers</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head)
                 + "</tr>" + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row)
                                     + "</tr>" for row in rows) + "</table>")
    parts.append("<h2>Trials</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in _TRIAL_HEAD)
                 + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in _trial_cells(t)) + "</tr>"
              for t in report.get("trials", [])]
    env = report.get("environment") or {}
    parts.append("</table><p><small>" + e(", ".join(f"{k} {v}" for k, v in env.items()))
                 + "</small></p></body></html>\n")
    return "".join(parts)


def render_report(report: dict[str, Any], directory: str | Path) -> list[Path]:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` into `directory`.

    Returns:
        The paths written.
    """
    out = Path(directory)
    images: dict[str, bytes] = {}
    for name, plot in (("sensitivity", plot_sensitivity), ("trajectory", plot_trajectory)):
        png = plot(report)
        if png is not None:
            images[name] = png
    written = []
    links = {}
    for name, png in images.items():
        path = atomic_write_bytes(out / PLOT_DIR / f"{name}.png", png)
        written.append(path)
        links[name] = f"{PLOT_DIR}/{name}.png"
    written.append(atomic_write_text(out / REPORT_MD, _markdown(report, links)))
    written.append(atomic_write_text(out / REPORT_HTML, _html(report, images)))
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written
