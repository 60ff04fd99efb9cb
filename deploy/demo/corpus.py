"""Demo corpora from text every machine has, split by file into train and held-out sets.

Domains:
- `python`: the standard library's .py sources;
- `c`: headers under /usr/include (skipped, with a message, where there are none);
- `prose`: English from the standard library's docstrings and comments.

A file's split is a hash of its path, so the split never changes and a held-out file never
feeds training in any domain (the prose of a held-out .py file is held out too).
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import sysconfig
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("prose", "python", "c")
HELD_OUT_PER_MILLE = 100  # 10% of files are held out
SKIPPED_STDLIB_DIRS = {"site-packages", "test", "tests", "idle_test", "lib2to3", "turtledemo"}


@dataclass(frozen=True)
class Document:
    domain: str
    source: str  # the file it came from, relative to its root
    text: str


@dataclass(frozen=True)
class CorpusSpec:
    """Where to read and how much: a cap on characters per domain and split keeps builds bounded."""

    max_train_chars: int = 6_000_000
    max_held_out_chars: int = 600_000
    stdlib_dir: Path = Path(sysconfig.get_paths()["stdlib"])
    include_dir: Path = Path("/usr/include")


@dataclass(frozen=True)
class Corpus:
    train: dict[str, list[Document]]
    held_out: dict[str, list[Document]]
    skipped: dict[str, str]  # domain -> why it is absent

    @property
    def domains(self) -> list[str]:
        return [d for d in DOMAINS if d in self.held_out]

    def fingerprint(self) -> str:
        """A hash of every document and its split: the manifest records it."""
        digest = hashlib.sha256()
        for split, docs_by_domain in (("train", self.train), ("held_out", self.held_out)):
            for domain in sorted(docs_by_domain):
                for doc in docs_by_domain[domain]:
                    digest.update(f"{split}\0{domain}\0{doc.source}\0".encode())
                    digest.update(doc.text.encode())
        return digest.hexdigest()[:16]


def is_held_out(source: str) -> bool:
    """The fixed split: a stable hash of the file's relative path."""
    return int(hashlib.sha256(source.encode()).hexdigest(), 16) % 1000 < HELD_OUT_PER_MILLE


def _stable_order(paths: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Files in a fixed pseudo-random order, so that a character cap samples across directories."""
    return sorted(paths, key=lambda item: hashlib.sha256(item[0].encode()).hexdigest())


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def python_sources(stdlib_dir: Path) -> list[tuple[str, Path]]:
    paths = []
    for directory, subdirs, files in os.walk(stdlib_dir):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_STDLIB_DIRS)  # prune, do not descend
        for name in files:
            if name.endswith(".py"):
                path = Path(directory, name)
                paths.append((str(path.relative_to(stdlib_dir)), path))
    return _stable_order(paths)


def c_headers(include_dir: Path) -> list[tuple[str, Path]]:
    return _stable_order([(str(p.relative_to(include_dir)), p) for p in include_dir.rglob("*.h")])


def prose_of(source_code: str) -> str:
    """English from a Python file: its docstrings and its comments of three words or more."""
    pieces: list[str] = []
    try:
        tree = ast.parse(source_code)
    except (SyntaxError, ValueError):
        return ""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                lines = [ln for ln in doc.splitlines() if not ln.lstrip().startswith((">>>", "..."))]
                pieces.append("\n".join(lines).strip())
    try:
        for token in tokenize.generate_tokens(io.StringIO(source_code).readline):
            if token.type == tokenize.COMMENT:
                comment = token.string.lstrip("#").strip()
                if len(comment.split()) >= 3 and not comment.startswith(("!", "-*-")):
                    pieces.append(comment)
    except (tokenize.TokenError, SyntaxError):
        pass
    return "\n\n".join(p for p in pieces if p)


def _documents(domain: str, files: list[tuple[str, Path]]) -> Iterator[Document]:
    for source, path in files:
        text = _read(path)
        if text is None:
            continue
        if domain == "prose":
            text = prose_of(text)
        if text.strip():
            yield Document(domain, source, text)


def _take(documents: Iterator[Document], max_train: int, max_held_out: int) -> tuple[list, list]:
    """Split documents by file until both caps are reached."""
    train, held_out, budget = [], [], {"train": max_train, "held_out": max_held_out}
    for doc in documents:
        split = "held_out" if is_held_out(doc.source) else "train"
        if budget[split] > 0:
            (held_out if split == "held_out" else train).append(doc)
            budget[split] -= len(doc.text)
        if budget["train"] <= 0 and budget["held_out"] <= 0:
            break
    return train, held_out


def build_corpus(spec: CorpusSpec = CorpusSpec()) -> Corpus:
    """Read the three domains, each split by file and capped by the spec."""
    python_files = python_sources(spec.stdlib_dir)
    sources = {"prose": python_files, "python": python_files, "c": c_headers(spec.include_dir)}
    train, held_out, skipped = {}, {}, {}
    for domain in DOMAINS:
        docs = _take(_documents(domain, sources[domain]), spec.max_train_chars, spec.max_held_out_chars)
        if not docs[0] or not docs[1]:
            where = spec.include_dir if domain == "c" else spec.stdlib_dir
            skipped[domain] = f"no usable {domain} files under {where}; the {domain} domain is skipped"
            continue
        train[domain], held_out[domain] = docs
    if "python" not in train or "prose" not in train:
        raise RuntimeError(f"the Python standard library sources were not found under {spec.stdlib_dir}")
    return Corpus(train=train, held_out=held_out, skipped=skipped)
