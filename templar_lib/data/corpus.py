"""A corpus of real English text that ships with Python itself: nothing is downloaded.

Two sources, in a fixed order so every build of the same Python gives the same text:
1. `pydoc_data.topics`: the language reference sections behind `help("TOPIC")` (≈ 0.47 MB on 3.11);
2. docstrings of the standard library's modules, classes and functions, read with `ast` from the source files
   in sorted path order and source order (nothing is imported; ≈ 1.2 MB).

The dataset built from it records a sha256 per page, so nodes agree on pages even if their Pythons differ.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly signatures and one-liners
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}


def documents(max_chars: int | None = None) -> list[str]:
    """The corpus as a list of documents, stopping once `max_chars` characters are collected (None: all)."""
    collected, total = [], 0
    for text in _iter_documents():
        collected.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return collected


def _iter_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()
    yield from _stdlib_docstrings(Path(os.__file__).parent)


def _stdlib_docstrings(root: Path) -> Iterator[str]:
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in _SKIP_DIRS)
        for file in sorted(f for f in files if f.endswith(".py")):
            try:
                tree = ast.parse(Path(directory, file).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    docstring = ast.get_docstring(node)
                    if docstring and len(docstring) >= MIN_DOCSTRING_CHARS:
                        yield docstring
