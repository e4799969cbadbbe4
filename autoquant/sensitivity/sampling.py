"""Which rows of each calibration call a sensitivity pass runs, in two stages.

The gradient pass (`autoquant.sensitivity.gradient`) costs about 3x a float pass on every
row. Its estimate is a sum over rows, so it can run in two stages: first a share of each
call's leading rows, then, only if the ranking from those rows is not settled yet, the
rows the first stage left out. Every row runs at most once; a ranking that settles early
costs about ``fraction`` of the full pass.
"""

from __future__ import annotations

from typing import Any

import torch

from autoquant.batches import first_tensor

__all__ = ["RowShare", "FIRST_ROWS", "row_draws"]

FIRST_ROWS = 32  # stage 1 runs every row until this many have run: the ranking needs some


class RowShare:
    """The rows of each calibration call, by call order: stage 1 runs ``fraction`` of the
    rows seen so far (owed across calls, so a pass of batch-1 calls runs every
    ``1/fraction``-th call whole), and every row until `FIRST_ROWS` have run; stage 2 the
    rest.

    The batch of a call is the first dimension of its first input tensor; the cut applies
    to every input tensor with that first dimension (`autoquant.batches.row_slice`).
    """

    def __init__(self, fraction: float) -> None:
        self.fraction = float(fraction)
        self.credit = 0.0
        self.taken: list[int] = []  # rows stage 1 ran, per call
        self.ran = 0  # rows stage 1 ran
        self.left = 0  # rows stage 1 left for stage 2
        self.stage = 1
        self.index = 0
        self.origin = (0, 0)  # (call, first row) of the rows the current call runs

    def start_stage(self, stage: int) -> None:
        """Begin stage 1 or 2 (a new pass over the calibration calls)."""
        self.stage, self.index = stage, 0

    @property
    def whole(self) -> bool:
        """Whether stage 1 runs every row (nothing is cut)."""
        return self.fraction >= 1.0

    def span(self, inputs: Any) -> tuple[int, int, int] | None:
        """``(batch, start, stop)``: the rows of this call the stage runs; None: all.
        Sets `origin`, which names each row the same way in either stage."""
        call = self.index if self.stage == 2 else len(self.taken)
        self.origin = (call, 0)
        if self.whole and self.stage == 1:
            self.taken.append(-1)
            return None
        try:
            first = first_tensor(inputs)
        except Exception:  # no tensor input: stage 1 runs the call whole
            first = None
        batch = (first.shape[0] if first.dim() else 1) if first is not None else -1
        if self.stage == 2:
            done = self.taken[self.index] if self.index < len(self.taken) else 0
            self.index += 1
            if batch < 0 or done < 0:  # ran whole in stage 1
                return batch, batch, batch
            self.origin = (call, min(done, batch))
            return batch, min(done, batch), batch
        if batch < 0:
            self.taken.append(batch)
            return None
        self.credit += self.fraction * batch
        rows = min(batch, max(int(self.credit), FIRST_ROWS - self.ran))
        self.credit = max(0.0, self.credit - rows)
        self.ran += rows
        self.taken.append(rows)
        self.left += batch - rows
        return batch, 0, rows


def row_draws(generator: torch.Generator, seed: int, origin: tuple[int, int], y: torch.Tensor,
              rows: int, uniform: bool) -> torch.Tensor:
    """Per row of `y` (from row ``origin[1]`` of call ``origin[0]``), standard normal draws
    shaped like the row, or one uniform draw: seeded by the row's place in the calibration,
    so a row gets the same draws whichever stage runs it and however its call was cut."""
    call, first = origin
    shape = (1,) if uniform else (y.shape[1:] if y.dim() >= 2 else y.shape)
    draw = torch.rand if uniform else torch.randn
    draws = []
    for row in range(first, first + rows):
        generator.manual_seed(seed + (call << 24) + row)
        draws.append(draw(shape, generator=generator, device=y.device))
    return torch.stack(draws)
