"""Progress bars for calibration, sensitivity and the search (tqdm, optional).

`ProgressBars` is a ``progress(stage, event, **info)`` callback for `autoquant.auto_quantize`.
Calibration and sensitivity bars count forward passes of the model (batches; a ranking that
takes a second pass over them grows its bar by one pass); the search bar counts evaluations
against the strategy's estimate. Without tqdm, or when disabled (stderr is not a terminal,
or ``-q``), it does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["ProgressBars", "bars_enabled"]

logger = logging.getLogger(__name__)


def bars_enabled(quiet: bool = False) -> bool:
    """True when bars should show: not quiet, stderr is a terminal and tqdm is installed."""
    if quiet or not sys.stderr.isatty():
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        logger.debug("tqdm is not installed (pip install autoquant[report]); no progress bars")
        return False
    return True


class ProgressBars:
    """A ``progress`` callback that draws tqdm bars on stderr when `enabled`."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._hook: Any = None
        self.calibration_batches: int | None = None

    def _open(self, desc: str, total: int | None, unit: str) -> None:
        from tqdm import tqdm

        self._close()
        self._bar = tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, leave=True,
                         dynamic_ncols=True)

    def _close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._bar is not None:
            if self._bar.total is not None and self._bar.n < self._bar.total:
                self._bar.total = self._bar.n  # the strategy finished early: show it done
                self._bar.refresh()
            self._bar.close()
            self._bar = None

    def _count_batches(self, model: Any) -> None:
        def hook(*_: Any) -> None:
            bar = self._bar
            if bar is not None:
                if bar.total is not None and bar.n >= bar.total and self.calibration_batches:
                    bar.total += self.calibration_batches  # another pass over the batches
                bar.update(1)

        self._hook = model.register_forward_hook(hook)

    def __call__(self, stage: str, event: str, **info: Any) -> None:
        if not self.enabled:
            return
        if event == "start" and stage in ("calibration", "sensitivity"):
            total = self.calibration_batches if stage == "sensitivity" else None
            self._open(stage, total, "batch")
            self._count_batches(info["model"])
        elif event == "end" and stage == "calibration":
            if self._bar is not None:
                self.calibration_batches = self._bar.n
            self._close()
        elif event == "end":
            self._close()
        elif stage == "search" and event == "start":
            self._open("search", info.get("total"), "eval")
        elif stage == "search" and event == "trial" and self._bar is not None:
            record = info["record"]
            self._bar.set_postfix_str(
                f"{record.label}: metric {record.metric:.4g} loss {record.loss:.3g} "
                f"{'pass' if record.passed else 'fail'}{' (reused)' if info.get('reused') else ''}",
                refresh=False,
            )
            self._bar.update(1)

    def close(self) -> None:
        """Close any open bar."""
        self._close()

    @contextlib.contextmanager
    def logging_redirected(self) -> Iterator[None]:
        """Route log records through tqdm while bars are shown, so lines do not tear bars."""
        if not self.enabled:
            yield
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[logging.getLogger()]):
            yield
