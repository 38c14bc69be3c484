"""The embedded default corpus: a few MB of real English prose, gathered from documentation already installed.

Tiny models need a text corpus that is on every machine, offline, with no download and no system package.
This module builds one from the documentation that ships with Python and with zoo's own dependencies:

1. the Python language reference (the ``pydoc_data.topics`` table that ``help()`` reads),
2. the docstrings of the standard library (tests, IDLE, lib2to3, demos left out),
3. the docstrings of numpy, torch (``nn``, ``optim``, ``distributions``, ``utils/data``, ``autograd``),
   transformers (outside ``models/`` and third-party integrations), datasets, accelerate, huggingface_hub,
   tqdm and safetensors.

Source files are read and parsed with :mod:`ast`, never imported, so no module's side effects run. Each
docstring is cleaned to prose: doctest and code paragraphs, reST/numpydoc underlines, license boilerplate and
paragraphs that are mostly symbols are dropped; docstrings shorter than :data:`MIN_DOCSTRING_CHARS` after
cleaning are dropped; exact duplicates are dropped (first occurrence wins). One *document* is one reference
topic, or one source module: its kept docstrings in source order, separated by blank lines, cut at docstring
boundaries into pieces of at most :data:`MAX_DOCUMENT_CHARS` characters.

Deterministic: on a given install the same documents come out in the same order (sources in the fixed
order above, files sorted by path). Each document goes to ``train``/``validation``/``test`` (98/1/1) by a
stable hash of its text. The result is cached as JSON under ``$ZOO_CACHE/corpus/`` (default
``~/.cache/zoo/corpus/``), keyed by the Python version, the versions of the packages read, this file's
text and the build options, so that a new install (or a new version of this module) builds anew. With
Python 3.11 and zoo's dependencies it is about 1,250 documents and 5 MB of text, built in 10-25 s.

    >>> from zoo.data import default_corpus, default_corpus_dataset
    >>> train = default_corpus("train")          # list[str]
    >>> ds = default_corpus_dataset()            # DatasetDict with a "text" column
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
MIN_DOCSTRING_CHARS = 200
MIN_DOCUMENT_CHARS = 300
MAX_DOCUMENT_CHARS = 8192


@dataclass(frozen=True)
class PackageSource:
    """Docstrings of one installed package, found without importing it.

    Args:
        package: top-level import name (``"numpy"``).
        distribution: the distribution whose version keys the cache (``"numpy"``, ``"PyYAML"``, ...).
        include: sub-folders to read, relative to the package folder; empty means the whole package.
        exclude: folder names skipped wherever they appear.
    """

    package: str
    distribution: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


_ALWAYS_EXCLUDED = ("tests", "test", "testing", "__pycache__", "benchmarks", "_vendor", "vendored")

STDLIB_EXCLUDED = (
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "site-packages",
    "dist-packages",
    "__pycache__",
)

PACKAGE_SOURCES: tuple[PackageSource, ...] = (
    PackageSource("numpy", "numpy", exclude=("f2py", "_pyinstaller", "distutils", "typing", "_typing")),
    PackageSource(
        "torch", "torch", include=("nn", "optim", "distributions", "utils/data", "autograd", "functional.py")
    ),
    PackageSource(
        "transformers",
        "transformers",
        exclude=("models", "commands", "cli", "kernels", "integrations", "quantizers", "exporters", "utils"),
    ),
    PackageSource("datasets", "datasets"),
    PackageSource("accelerate", "accelerate"),
    PackageSource("huggingface_hub", "huggingface_hub", exclude=("inference", "cli", "commands")),
    PackageSource("tqdm", "tqdm"),
    PackageSource("safetensors", "safetensors"),
)


def default_cache_dir() -> Path:
    """``$ZOO_CACHE/corpus`` if ``ZOO_CACHE`` is set, else ``~/.cache/zoo/corpus``."""
    root = os.environ.get("ZOO_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "zoo") / "corpus"


def default_corpus(
    split: str = "train", *, max_files: int | None = None, cache_dir: str | os.PathLike | None = None
) -> list[str]:
    """The documents of one split of the default corpus, building and caching it on first use.

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``.
        max_files: read at most this many files per source (a small, fast corpus for tests); None reads all.
        cache_dir: where the cache lives; defaults to :func:`default_cache_dir`.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    return list(_load_or_build(max_files, str(cache_dir or default_cache_dir()))[split])


def default_corpus_dataset(*, max_files: int | None = None, cache_dir: str | os.PathLike | None = None):
    """The default corpus as a ``datasets.DatasetDict`` (train/validation/test) with a ``"text"`` column."""
    from datasets import Dataset, DatasetDict

    splits = _load_or_build(max_files, str(cache_dir or default_cache_dir()))
    return DatasetDict({name: Dataset.from_dict({"text": list(splits[name])}) for name in SPLITS})


def split_of(document: str) -> str:
    """The split a document belongs to, from a stable hash of its text: 1% test, 1% validation, 98% train."""
    bucket = int.from_bytes(hashlib.sha1(document.encode("utf-8")).digest()[:8], "big") % 100
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


@functools.lru_cache(maxsize=4)
def _load_or_build(max_files: int | None, cache_dir: str) -> dict[str, tuple[str, ...]]:
    key = corpus_cache_key(max_files)
    path = Path(cache_dir) / f"corpus-{key}.json"
    if path.exists():
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            return {name: tuple(payload["splits"][name]) for name in SPLITS}
        except (OSError, ValueError, KeyError) as err:
            logger.warning("Ignoring unreadable corpus cache %s (%s); building it again", path, err)
    documents = build_documents(max_files=max_files)
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for doc in documents:
        splits[split_of(doc)].append(doc)
    payload = {"key": key, "versions": source_versions(), "max_files": max_files, "splits": splits}
    _atomic_write_text(path, json.dumps(payload, ensure_ascii=False))
    logger.info("Built the default corpus (%d documents) into %s", len(documents), path)
    return {name: tuple(docs) for name, docs in splits.items()}


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        # mkstemp makes the file private; a cache is as readable as any other file the user writes.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def source_versions() -> dict[str, str]:
    """The versions of everything the corpus is read from: Python itself and each package (or "absent")."""
    versions = {"python": f"{sys.implementation.name}-{sys.version}"}
    for source in PACKAGE_SOURCES:
        try:
            versions[source.distribution] = importlib.metadata.version(source.distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[source.distribution] = "absent"
    return versions


def corpus_cache_key(max_files: int | None = None) -> str:
    """A short hash of the source versions, of this file (its sources and cleaning) and of the build options."""
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    blob = json.dumps(
        {"code": code, "versions": source_versions(), "max_files": max_files},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def build_documents(max_files: int | None = None, progress: bool = True) -> list[str]:
    """Gather, clean and deduplicate the corpus; the documents in their deterministic order (no splitting)."""
    topics = [doc for doc in _reference_topics() if len(doc) >= MIN_DOCUMENT_CHARS]
    documents = list(dict.fromkeys(topics[:max_files]))
    files = _source_files(max_files)
    seen_docstrings: set[str] = set()
    seen_documents: set[str] = set(documents)
    for path in tqdm(files, desc="Building the zoo default corpus", unit="file", disable=not progress):
        kept = []
        for docstring in _docstrings(path):
            text = clean_docstring(docstring)
            if len(text) < MIN_DOCSTRING_CHARS or text in seen_docstrings:
                continue
            seen_docstrings.add(text)
            kept.append(text)
        for document in _group(kept):
            if len(document) >= MIN_DOCUMENT_CHARS and document not in seen_documents:
                seen_documents.add(document)
                documents.append(document)
    return documents


def _group(docstrings: list[str]) -> Iterator[str]:
    """Consecutive docstrings joined into documents of <= MAX_DOCUMENT_CHARS (a longer one stays whole)."""
    group: list[str] = []
    size = 0
    for text in docstrings:
        if group and size + len(text) > MAX_DOCUMENT_CHARS:
            yield "\n\n".join(group)
            group, size = [], 0
        group.append(text)
        size += len(text) + 2
    if group:
        yield "\n\n".join(group)


def _reference_topics() -> list[str]:
    """The topics of the Python language reference, from ``pydoc_data/topics.py`` without importing it."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    try:
        tree = _parse(path)
    except OSError:
        tree = None
    for node in tree.body if tree is not None else []:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return [_clean_reference_topic(topics[name]) for name in sorted(topics)]
    return []


def _source_files(max_files: int | None) -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    groups = [_walk(stdlib, (".",), STDLIB_EXCLUDED)]
    for source in PACKAGE_SOURCES:
        spec = importlib.util.find_spec(source.package)
        if spec is None or not spec.submodule_search_locations:
            logger.info("Corpus source %s is not installed; skipping it", source.package)
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        groups.append(_walk(root, source.include or (".",), _ALWAYS_EXCLUDED + source.exclude))
    return [path for group in groups for path in group[:max_files]]


def _walk(root: Path, include: tuple[str, ...], exclude: tuple[str, ...]) -> list[Path]:
    files = []
    for sub in include:
        start = root / sub
        if start.is_file():
            files.append(start)
            continue
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if d not in exclude]
            files.extend(Path(dirpath, name) for name in filenames if name.endswith(".py"))
    return sorted(set(files), key=lambda p: p.relative_to(root.parent).as_posix())


def _parse(path: Path) -> ast.Module | None:
    source = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError):
            return None


_DEFINITIONS = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def _docstrings(path: Path) -> Iterator[str]:
    """Module, class and function docstrings of one file, in source order."""
    try:
        tree = _parse(path)
    except OSError:
        return
    if tree is None:
        return
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Module | _DEFINITIONS):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
        children = [*getattr(node, "body", []), *getattr(node, "orelse", [])]
        stack.extend(reversed([n for n in children if isinstance(n, _DEFINITIONS | ast.If)]))


_LICENSE = re.compile(
    r"copyright|all rights reserved|licen[sc]ed under|\bwarrant|permission is hereby granted|spdx-license"
    r"|apache license|gnu (lesser )?general public|redistribution and use",
    re.IGNORECASE,
)
_UNDERLINE = re.compile(r"^\s*([-=~^*#+`.:_])\1{2,}\s*$")
_CODE_START = re.compile(
    r"^\s*(>>>|\.\.\. |\$ |In \[\d+\]:|```|\.\. (code-block|doctest|testcode|testoutput))"
)
_DIRECTIVE = re.compile(r"^\s*\.\. [\w:-]+::")
# A line of Python: a statement keyword or an assignment at its start, or a call and nothing else.
_CODE_LINE = re.compile(
    r"^\s*(for \w.* in .*:$|if .*:$|elif |else:|try:|except\b|def \w+\(|class \w+[(:]|import \w|from [\w.]+ import"
    r"|return\b|yield\b|with .*:$|while .*:$|[\w.\[\]'\"]+ [-+*/]?= |[\w.]+\(.*\)$)"
)
_NOT_PROSE = re.compile(r"[^\w\s]|[\d_]")
_WORD = re.compile(r"[A-Za-z]{3,}")


def clean_docstring(text: str) -> str:
    """Keep the prose paragraphs of a docstring; drop code, doctests, tables, underlines and license text."""
    kept = []
    maybe_license = _LICENSE.search(text) is not None
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        lines = [line.rstrip() for line in paragraph.splitlines() if not _UNDERLINE.match(line)]
        if not lines or any(_CODE_START.match(line) for line in lines) or _DIRECTIVE.match(lines[0]):
            continue
        body = "\n".join(lines)
        if (maybe_license and _LICENSE.search(body)) or not _is_prose(body) or _is_code(lines):
            continue
        kept.append(body)
    return "\n\n".join(kept).strip()


def _is_prose(text: str) -> bool:
    """Mostly letters and spaces, with some real words: rules out code, tables and symbol soup."""
    if not text.strip():
        return False
    symbols = len(_NOT_PROSE.findall(text))
    return symbols <= 0.2 * len(text) and len(_WORD.findall(text)) >= 3


def _is_code(lines: list[str]) -> bool:
    return 2 * sum(_CODE_LINE.match(line) is not None for line in lines) >= len(lines)


def _clean_reference_topic(text: str) -> str:
    kept = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        lines = [line.rstrip() for line in paragraph.splitlines() if not _UNDERLINE.match(line)]
        body = "\n".join(lines).strip("\n")
        # Reference topics indent their code examples and grammar productions.
        if not body or body.startswith("   ") or any(_CODE_START.match(line) for line in lines):
            continue
        if _is_prose(body):
            kept.append(body)
    return "\n\n".join(kept)
