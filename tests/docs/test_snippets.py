"""The documentation is tested: every ```python block of README.md and docs/*.md runs.

The blocks of one file run in order in one shared namespace (a page's later blocks use
what its earlier blocks defined), with the working directory a fresh temporary folder
and the repository root on ``sys.path``. Shell, YAML and output blocks are fenced as
``bash`` / ``yaml`` / ``text`` (or ``json``) and are not run. The README stays short;
every relative link of the README and the docs pages points to a file (and heading) that
exists; every ``autoquant.*`` name, repository file and ``test_file.py::test_name`` a page
mentions exists; every page is in the mkdocs nav.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
MAX_README_LINES = 300
FENCES = ("python", "bash", "yaml", "text", "json")
# pages whose examples need an optional extra: skipped (not failed) where it is missing
NEEDS = {
    "deployment.md": ("onnx", "onnxruntime", "onnxscript"),
    "reports.md": ("jsonschema",),
    "parallel.md": ("distributed",),
}
DIGITS = ("sklearn",)  # the bundled digits example reads scikit-learn's data set

FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)[^\n]*$")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def blocks(path: Path) -> list[tuple[str, int, str]]:
    """``(language, first line number, code)`` of every fenced block of `path`."""
    out: list[tuple[str, int, str]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, lang, start = len(match["indent"]), match["lang"], i + 1
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{_id(path)}:{start}: the code fence is never closed")
        out.append((lang, start + 1, "\n".join(body) + "\n"))
        i += 1
    return out


def unfenced(path: Path) -> str:
    """The text of `path` without its fenced blocks."""
    text = path.read_text(encoding="utf-8")
    return re.sub(r"^ *```.*?^ *```[ \t]*$", "", text, flags=re.S | re.M)


def prose(path: Path) -> str:
    """The text of `path` without fenced blocks and inline code (where links are not)."""
    return re.sub(r"`[^`\n]*`", "", unfenced(path))


def slug(heading: str) -> str:
    """A heading's anchor, as mkdocs (Python-Markdown's toc) and GitHub make it for the
    plain headings these pages use."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    """The anchors of the headings of `path`."""
    return {slug(m[1]) for m in re.finditer(r"^#{1,6} +(.+?) *#*$", unfenced(path), flags=re.M)}


@pytest.mark.parametrize("path", PAGES, ids=_id)
def test_code_blocks_are_fenced_with_a_known_language(path: Path) -> None:
    for lang, line, _ in blocks(path):
        assert lang in FENCES, (f"{_id(path)}:{line}: fence the block as one of "
                                f"{', '.join(FENCES)} (got {lang or 'no language'!r})")
    lines = path.read_text(encoding="utf-8").splitlines()
    indented = [n for n, text in enumerate(lines, 1) if re.match(r" +```", text)]
    assert not indented, (f"{_id(path)}: lines {indented}: a fence inside a list item does "
                          "not render in plain mkdocs; put the block at the left margin")


@pytest.mark.parametrize("path", PAGES, ids=_id)
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = [(line, text) for lang, line, text in blocks(path) if lang == "python"]
    if not code:
        pytest.skip("no python block")
    needs = NEEDS.get(path.name, ())
    if any("examples.digits" in text for _, text in code):
        needs = (*needs, *DIGITS)
    for module in needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module} (pip install -e '.[all]')")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    name = "docs_" + re.sub(r"\W", "_", path.stem)
    module = types.ModuleType(name)  # a real module, so snippet classes pickle by reference
    monkeypatch.setitem(sys.modules, name, module)
    with _logging_restored():  # the CLI examples configure logging for the process
        for line, text in code:
            # padded so that a traceback names the Markdown file and its line
            exec(compile("\n" * (line - 1) + text, str(path), "exec"), module.__dict__)


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    loggers = [root, *(logging.getLogger(name) for name in ("autoquant", "optuna"))]
    levels, handlers = [lg.level for lg in loggers], list(root.handlers)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        root.handlers[:] = handlers


def test_readme_is_short() -> None:
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= MAX_README_LINES, (f"README.md has {count} lines (at most "
                                       f"{MAX_README_LINES}); move the details to docs/")


@pytest.mark.parametrize("path", PAGES, ids=_id)
def test_relative_links_point_to_existing_files(path: Path) -> None:
    broken = []
    for target in LINK.findall(prose(path)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {_id(dest)})")
    assert not broken, f"{_id(path)}: broken links: {', '.join(broken)}"


def test_every_docs_page_is_in_the_mkdocs_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.name not in nav]
    assert not missing, f"add {', '.join(missing)} to the nav of mkdocs.yml"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("path", PAGES, ids=_id)
def test_named_modules_files_and_tests_exist(path: Path) -> None:
    """Every `autoquant.x.y` name the page mentions resolves, and every repository file
    and ``test_file.py::test_name`` it mentions exists (so a refactor cannot silently
    leave the docs behind)."""
    text = unfenced(path)
    code = re.findall(r"`([^`\n]+)`", text)
    missing = []
    for token in code:
        for dotted in re.findall(r"\bautoquant(?:\.\w+)+", token):
            if not _resolves(dotted):
                missing.append(dotted)
        for file in re.findall(r"\b(?:tests|benchmarks|examples|autoquant|strategies|"
                               r"evaluators)/[\w/.-]+\.(?:py|yaml|json)\b", token):
            if not (ROOT / file).is_file():
                missing.append(file)
    tests = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "tests").rglob("test_*.py")}
    for file, name in re.findall(r"\b(test_\w+\.py)::(test_\w+)", text):
        if file not in tests or not re.search(rf"def {name}\b", tests[file]):
            missing.append(f"{file}::{name}")
    assert not missing, f"{_id(path)} names what does not exist: {', '.join(missing)}"
