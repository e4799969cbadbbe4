"""``python -m autoquant``: the same as the ``autoquant`` command."""

from __future__ import annotations

import sys

from autoquant.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main())
