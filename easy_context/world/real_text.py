"""Real English text with no download: the Python standard library's own documentation, or a folder of .txt files.

``pydoc`` is the prose every Python installation carries: the docstrings of the standard library's pure-Python
modules (read from their source with ``ast``: nothing is imported or run) and the language-reference topics that
``help()`` shows (``pydoc_data.topics``), about 1.8 MB of English (roughly 400K tokens of a Llama tokenizer) written
for people. One document per module or topic, in name order. It depends on the Python version, so every description
carries the version and a digest of the text.

Documents split into a ``train`` part and a ``heldout`` part by a hash of their name (module, topic or file name),
the same on every machine: a model trained on one part is measured on the other.
"""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import os
import sys
import sysconfig

PYDOC = "pydoc"
SPLITS = ("all", "train", "heldout")
HELDOUT_SHARE = 0.2  # of the documents, chosen by name hash
MIN_DOCSTRING_WORDS = 8  # shorter docstrings ("Return self.") are signatures more than prose
_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages", "__pycache__",
              "ensurepip", "lib2to3", "tkinter"}


@functools.lru_cache(maxsize=1)  # parsing the library takes seconds; its text cannot change while Python runs
def stdlib_documents() -> tuple[tuple[str, str], ...]:
    """(module name, text) per pure-Python standard-library module with docstrings: its docstrings of at least
    ``MIN_DOCSTRING_WORDS`` words (module, classes, functions, in source order), blank-line separated; sorted by
    name. The sources are parsed, never imported."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):  # e.g. a template file that is not Python
                continue
            parts = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc.split()) >= MIN_DOCSTRING_WORDS:
                        parts.append(doc)
            if parts:
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                docs.append((module, "\n\n".join(parts)))
    return tuple(sorted(docs))


def topic_documents() -> list[tuple[str, str]]:
    """(topic, text) of the language-reference pages ``help("topic")`` shows, sorted by topic."""
    from pydoc_data.topics import topics

    return sorted((f"topic:{name}", text) for name, text in topics.items())


def split_of(name: str) -> str:
    """"heldout" for about ``HELDOUT_SHARE`` of document names (by a SHA-256 of the name), else "train"."""
    return "heldout" if hashlib.sha256(name.encode()).digest()[0] < 256 * HELDOUT_SHARE else "train"


def _folder_documents(path: str) -> list[tuple[str, str]]:
    if not os.path.isdir(path):
        raise ValueError(f"text folder {path!r} does not exist (built-in text: {PYDOC!r})")
    files = sorted(glob.glob(os.path.join(path, "*.txt")))
    if not files:
        raise ValueError(f"text folder {path!r} has no .txt files")
    out = []
    for name in files:
        with open(name, encoding="utf-8") as f:
            out.append((os.path.basename(name), f.read()))
    return out


def named_documents(source: str, split: str = "all") -> list[tuple[str, str]]:
    """(name, text) of the documents of ``source`` ("pydoc" or a folder of .txt files, read in name order) in
    ``split`` ("all", "train" or "heldout"). ValueError for an unknown split, a missing folder, or no text."""
    if split not in SPLITS:
        raise ValueError(f"unknown text split {split!r}: use one of {', '.join(SPLITS)}")
    docs = [*stdlib_documents(), *topic_documents()] if source == PYDOC else _folder_documents(source)
    if split != "all":
        docs = [(name, text) for name, text in docs if split_of(name) == split]
    if not any(text.strip() for _, text in docs):
        raise ValueError(f"the {split} documents of {source!r} hold no text")
    return docs


def documents(source: str, split: str = "all") -> list[str]:
    """The texts of ``named_documents(source, split)``."""
    return [text for _, text in named_documents(source, split)]


def corpus(source: str, split: str = "all") -> tuple[str, str]:
    """(text, description): the documents of ``source`` in ``split`` joined by blank lines, and a line naming them
    (source, split, Python version for pydoc, document count, SHA-256 of the text) for results files."""
    docs = documents(source, split)
    text = "\n\n".join(docs)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    what = (f"pydoc (Python {sys.version.split()[0]} standard library docs)" if source == PYDOC else
            os.path.basename(os.path.normpath(source)))
    return text, f"{what}, {split}: {len(docs)} documents, {len(text)} characters (sha256 {digest})"
