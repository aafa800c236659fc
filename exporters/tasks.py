"""Real text-classification tasks that exist offline on any machine with CPython 3.

Two sources, both shipped with the Python interpreter itself, so a fresh Debian
``python:3.x`` image (slim or not) has them and every machine with the same Python
version builds the same examples:

* ``stdlib-docs``: docstrings of the standard library (modules, classes, functions and
  methods, found with :mod:`inspect`), labelled by the family of the module that defines
  them (text, numeric, files, network, concurrency, formats).
* ``pydoc-topics``: paragraphs of the Language Reference help topics in
  ``pydoc_data.topics`` (what ``help("if")`` prints), labelled by the reference chapter
  the topic belongs to (lexical, expressions, statements, data model, built-in types).

Texts are whitespace-normalised and deduplicated; a text claimed by two labels is
dropped. Splits are a pure function of the text (SHA-256), so they are stable across
runs and machines and do not depend on iteration order. Pure Python, no torch.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MIN_WORDS = 6
MAX_CHARS = 600

# Module family -> stdlib modules (and their submodules) whose own objects are labelled so.
DOC_FAMILIES: dict[str, tuple[str, ...]] = {
    "text": (
        "string", "re", "textwrap", "difflib", "unicodedata", "stringprep", "codecs",
        "locale", "gettext", "html", "shlex", "readline", "rlcompleter", "tokenize",
        "pprint", "reprlib",
    ),
    "numeric": ("math", "cmath", "decimal", "_pydecimal", "fractions", "random",
                "statistics", "numbers", "operator", "array", "bisect", "heapq"),
    "files": ("os", "posixpath", "pathlib", "shutil", "glob", "fnmatch", "tempfile",
              "filecmp", "stat", "io", "_pyio", "fileinput", "zipfile", "tarfile", "gzip",
              "bz2", "lzma", "zlib", "linecache", "mmap"),
    "network": ("socket", "ssl", "http", "urllib", "email", "smtplib", "imaplib", "poplib",
                "ftplib", "ipaddress", "mailbox", "xmlrpc", "socketserver", "wsgiref",
                "mimetypes", "webbrowser"),
    "concurrency": ("threading", "_threading_local", "multiprocessing", "concurrent",
                    "asyncio", "queue", "sched", "subprocess", "selectors", "signal",
                    "contextvars"),
    "formats": ("json", "csv", "pickle", "pickletools", "xml", "configparser", "plistlib",
                "struct", "base64", "binascii", "tomllib", "marshal", "copyreg", "shelve",
                "dbm", "quopri", "uu", "netrc"),
}

# pydoc help topic -> Language Reference chapter (from the Python documentation's own
# table of contents: reference/lexical_analysis, expressions, simple_stmts, compound_stmts,
# datamodel, executionmodel; library/stdtypes). Topics outside these chapters are unused.
TOPIC_CHAPTERS: dict[str, str] = {
    **dict.fromkeys(
        ["atom-identifiers", "identifiers", "id-classes", "strings", "integers", "floating",
         "imaginary", "numbers", "formatstrings"], "lexical"),
    **dict.fromkeys(
        ["atom-literals", "attribute-references", "await", "binary", "bitwise", "booleans",
         "calls", "comparisons", "conversions", "exprlists", "in", "lambda", "lists",
         "operator-summary", "power", "shifting", "slicings", "subscriptions", "unary",
         "dict"], "expressions"),
    **dict.fromkeys(
        ["assert", "assignment", "augassign", "break", "continue", "del", "global", "import",
         "nonlocal", "pass", "raise", "return", "yield", "async", "class", "compound", "else",
         "for", "function", "if", "try", "while", "with"], "statements"),
    **dict.fromkeys(
        ["attribute-access", "callable-types", "context-managers", "customization",
         "numeric-types", "objects", "sequence-types", "specialnames", "types"], "datamodel"),
    **dict.fromkeys(
        ["bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object",
         "bltin-type-objects", "specialattrs", "string-methods", "truth", "typesfunctions",
         "typesmapping", "typesmethods", "typesmodules", "typesseq", "typesseq-mutable"],
        "stdtypes"),
}


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def counts(self, num_labels: int) -> list[int]:
        c = Counter(self.labels)
        return [c.get(i, 0) for i in range(num_labels)]


@dataclass(frozen=True)
class Task:
    name: str
    label_names: tuple[str, ...]
    train: Split
    test: Split
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def describe(self) -> str:
        k = self.num_labels
        return (f"{self.name}: {len(self.train)} train / {len(self.test)} test; "
                f"train counts {dict(zip(self.label_names, self.train.counts(k), strict=True))}; "
                f"test counts {dict(zip(self.label_names, self.test.counts(k), strict=True))}")


def normalise(text: str) -> str:
    """Collapse whitespace; cut long texts at a word boundary near ``MAX_CHARS``."""
    text = " ".join(text.split())
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS].rsplit(" ", 1)[0]
    return text


def _bucket(text: str) -> float:
    """A uniform number in [0, 1) that depends on the text only."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def build_task(name: str, labelled: Iterable[tuple[str, str]], label_names: Iterable[str],
               train_fraction: float, source: str) -> Task:
    """Normalise, deduplicate (dropping texts seen under two labels) and split by hash."""
    names = tuple(label_names)
    index = {n: i for i, n in enumerate(names)}
    seen: dict[str, int] = {}
    conflicted: set[str] = set()
    for raw, label in labelled:
        text = normalise(raw)
        if len(text.split()) < MIN_WORDS:
            continue
        lab = index[label]
        if seen.setdefault(text, lab) != lab:
            conflicted.add(text)
    items = sorted((t, lab) for t, lab in seen.items() if t not in conflicted)
    train = [(t, lab) for t, lab in items if _bucket(t) < train_fraction]
    test = [(t, lab) for t, lab in items if _bucket(t) >= train_fraction]
    return Task(
        name=name,
        label_names=names,
        train=Split([t for t, _ in train], [lab for _, lab in train]),
        test=Split([t for t, _ in test], [lab for _, lab in test]),
        source=source,
    )


# --- stdlib docstrings ------------------------------------------------------------------

def _family_of(module_name: str) -> str | None:
    root = module_name.split(".")[0]
    for family, roots in DOC_FAMILIES.items():
        if root in roots or module_name in roots:
            return family
    return None


def _submodules(root: str) -> Iterator[str]:
    yield root
    try:
        module = importlib.import_module(root)
    except ImportError:
        return
    path = getattr(module, "__path__", None)
    if path is None:
        return
    import pkgutil

    for info in pkgutil.walk_packages(path, prefix=root + "."):
        if any(part.startswith("_") or part in {"test", "tests", "__main__"}
               for part in info.name.split(".")[1:]):
            continue
        yield info.name


# Objects of a module implemented in C report their accelerator module as ``__module__``.
_IMPLEMENTED_IN = {"os": ("posix",)}


def _own_docstrings(module) -> Iterator[str]:
    """Docstrings of the module and of the classes/functions/methods it defines."""
    name = module.__name__
    owners = {name, "_" + name, *_IMPLEMENTED_IN.get(name, ())}
    if module.__doc__:
        yield module.__doc__
    for attr in sorted(vars(module)):
        obj = vars(module)[attr]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) not in owners:
            continue
        if obj.__doc__:
            yield obj.__doc__
        if inspect.isclass(obj):
            for member_name in sorted(vars(obj)):
                member = vars(obj)[member_name]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if (inspect.isroutine(member) or isinstance(member, property)) and member.__doc__:
                    yield member.__doc__


def stdlib_docstrings() -> Iterator[tuple[str, str]]:
    """``(docstring, family)`` pairs over every module listed in :data:`DOC_FAMILIES`."""
    done: set[str] = set()
    for family, roots in DOC_FAMILIES.items():
        for root in roots:
            for mod_name in _submodules(root):
                if mod_name in done:
                    continue
                done.add(mod_name)
                if _family_of(mod_name) != family:
                    continue
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        module = importlib.import_module(mod_name)
                except Exception:  # noqa: BLE001 - optional C parts missing on this build
                    continue
                for doc in _own_docstrings(module):
                    yield doc, family


def stdlib_docs_task(train_fraction: float = 0.4) -> Task:
    return build_task("stdlib-docs", stdlib_docstrings(), DOC_FAMILIES, train_fraction,
                      source="inspect over the Python standard library, labelled by module family")


# --- pydoc topics ---------------------------------------------------------------------

_PARAGRAPH = re.compile(r"\n\s*\n")


def pydoc_paragraphs() -> Iterator[tuple[str, str]]:
    """``(paragraph, chapter)`` pairs from ``pydoc_data.topics``; code-only blocks skipped."""
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        chapter = TOPIC_CHAPTERS.get(topic)
        if chapter is None:
            continue
        for para in _PARAGRAPH.split(topics[topic]):
            stripped = para.strip()
            # Headings are underlined with *** / === / ---; drop pure code and tables.
            if not stripped or stripped.startswith((">>>", "+--", "===", "***", "---")):
                continue
            letters = sum(ch.isalpha() for ch in stripped)
            if letters < 0.6 * len(stripped.replace(" ", "")):
                continue
            yield stripped, chapter


def pydoc_topics_task(train_fraction: float = 0.4) -> Task:
    chapters = ("lexical", "expressions", "statements", "datamodel", "stdtypes")
    return build_task("pydoc-topics", pydoc_paragraphs(), chapters, train_fraction,
                      source="pydoc_data.topics paragraphs, labelled by Language Reference chapter")


def accuracy_ci(correct: int, n: int, z: float = 1.959964) -> tuple[float, float, float]:
    """Accuracy and its 95% Wilson score interval (sound near 0 and 1, unlike the normal one)."""
    if n <= 0:
        raise ValueError("accuracy of an empty set")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)


TASKS = {"stdlib-docs": stdlib_docs_task, "pydoc-topics": pydoc_topics_task}


def load_task(name: str, train_fraction: float = 0.4) -> Task:
    try:
        factory = TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None
    return factory(train_fraction)
