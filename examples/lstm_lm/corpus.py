"""The corpus text: docstrings of a fixed list of standard-library modules.

`collect_docstrings` runs this file as a script in a fresh interpreter (``python -I``)
that imports torch first, as the example always did (torch's import replaces
``inspect.getsourcefile``, so that docstring is not in the text the figures in the docs
were measured on). A package the calling process imported (Ray, for one, replaces
``inspect.isgenerator``) can then not change the text.
"""

from __future__ import annotations

import importlib
import inspect
import sys

__all__ = ["MODULES", "docstrings_here"]

MODULES = (
    "argparse", "asyncio.events", "bisect", "calendar", "collections", "configparser",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "functools", "gettext", "glob", "heapq", "http.client",
    "imaplib", "inspect", "ipaddress", "json", "logging", "mailbox", "pathlib", "pickle",
    "pprint", "random", "shlex", "shutil", "smtplib", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "unittest.case", "urllib.parse",
    "uuid", "zipfile",
)


def docstrings_here(modules: tuple[str, ...] = MODULES) -> str:
    """The docstrings of `modules` and of their public classes, functions and methods, as
    this interpreter has them (`examples.lstm_lm.data.collect_docstrings` runs it in a
    clean one)."""
    parts: list[str] = []
    seen: set[str] = set()  # by content: inherited docstrings appear once

    def add(obj: object) -> None:
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 40 and doc not in seen:
            seen.add(doc)
            parts.append(doc.strip())

    for name in modules:
        module = importlib.import_module(name)
        add(module)
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            add(obj)
            if inspect.isclass(obj):
                for member in sorted(vars(obj)):
                    if not member.startswith("_"):
                        add(vars(obj)[member])
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    import torch  # noqa: F401  (the text is the one seen after importing torch)

    sys.stdout.buffer.write(docstrings_here().encode("utf-8"))
