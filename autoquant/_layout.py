"""Where ``autoquant.strategies`` and ``autoquant.evaluators`` are found in a checkout.

The product's top-level ``strategies/`` and ``evaluators/`` folders install *inside* the
autoquant namespace (pyproject's ``package-dir``), so a user's own folder of the same name
can never shadow them. A wheel copies them into ``autoquant/``; setuptools' editable
install and a checkout on ``sys.path`` do not map a sub-package to another folder, so this
finder does, for those two names only and only while ``autoquant/`` has no such folder.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

__all__: list[str] = []

_PACKAGE = Path(__file__).resolve().parent
_SIBLINGS = ("strategies", "evaluators")


class _SiblingFolders(importlib.abc.MetaPathFinder):
    """Finds ``autoquant.<name>`` in the folder ``<name>/`` beside ``autoquant/``."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])


def _install() -> None:
    """Put the finder on ``sys.meta_path`` once, if this is a checkout."""
    if any(isinstance(f, _SiblingFolders) for f in sys.meta_path):
        return
    folders = {f"autoquant.{name}": _PACKAGE.parent / name for name in _SIBLINGS
               if not (_PACKAGE / name).exists()
               and (_PACKAGE.parent / name / "__init__.py").is_file()}
    if folders:
        sys.meta_path.append(_SiblingFolders(folders))


_install()
