"""Built-in fine-tuning tasks made from the Python standard library, so the classification and
QA configs run on a fresh machine with no download (as the LM demo trains on the same sources).

- Classification (`write_classification`): the docstring of a function or class -> the
  package that defines it, one of `PACKAGES` (4 classes). JSON Lines, `text` + `label`.
- Extractive QA (`write_squad`): a context lists several functions of one standard-library
  module (any module outside the test suites) as "name(arguments): first sentence of the
  docstring."; questions ask "What does name do?" and the answer is that sentence. Every
  context also gets a question about a function it does not list, marked `is_impossible`
  (SQuAD v2.0 format), so a model must read the context, not guess.

Both are split by a hash: 80 / 20 of the definitions (file and line) for classification,
90 / 10 of the modules for QA, so QA's train and dev never share a context. The records depend
on the Python version's standard library; the configs' docstrings state what a run reaches on
Python 3.11.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sysconfig
from pathlib import Path

PACKAGES = ("asyncio", "email", "logging", "xml")
FUNCTIONS_PER_CONTEXT = 4
DEV_FRACTION = 0.2
QA_DEV_FRACTION = 0.1  # of modules: their sizes vary, so of questions it is ~0.1-0.3


def stdlib_files() -> list[Path]:
    """The Python standard library's own sources: real text present on every machine (the
    demo's corpus and these tasks' source)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def _is_dev(name: str, fraction: float = DEV_FRACTION) -> bool:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def _package_modules(packages=PACKAGES):
    """(package, module path relative to the stdlib, parsed tree) of the packages' sources
    (None: every module outside the test suites)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        parts = path.relative_to(root).parts
        if "test" in path.name or any(p in ("test", "tests", "idle_test") for p in parts):
            continue
        package = parts[0].removesuffix(".py")
        if packages is not None and package not in packages:
            continue
        relative = "/".join(parts)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        yield package, relative, tree


def _write_lines(path: str, rows) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)


def write_classification(directory: str) -> tuple[str, str]:
    """Writes train.jsonl and dev.jsonl into `directory`; returns their paths."""
    splits = {"train": [], "dev": []}
    for package, relative, tree in _package_modules():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                split = "dev" if _is_dev(f"{relative}:{node.lineno}") else "train"
                splits[split].append({"text": doc, "label": package})
    os.makedirs(directory, exist_ok=True)
    paths = []
    for split, rows in splits.items():
        paths.append(os.path.join(directory, f"{split}.jsonl"))
        _write_lines(paths[-1], rows)
    return paths[0], paths[1]


def _first_sentence(doc: str) -> str:
    line = doc.strip().splitlines()[0].strip()
    return re.split(r"(?<=\.)\s", line, maxsplit=1)[0].rstrip(".")


def _functions(tree) -> list[tuple[str, str, str]]:
    """(name, arguments, first docstring sentence) of a module's documented functions, each
    name once."""
    found, seen = [], set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.name in seen or node.name.startswith("__"):
            continue
        sentence = _first_sentence(doc)
        if not 3 <= len(sentence.split()) <= 16:
            continue
        args = ", ".join(a.arg for a in node.args.args if a.arg not in ("self", "cls"))
        found.append((node.name, args, sentence))
        seen.add(node.name)
    return found


def write_squad(directory: str) -> tuple[str, str]:
    """Writes train.json and dev.json (SQuAD v2.0 format) into `directory`; returns their
    paths."""
    splits = {"train": [], "dev": []}
    for _, relative, tree in _package_modules(packages=None):
        functions = _functions(tree)
        chunks = [
            functions[i : i + FUNCTIONS_PER_CONTEXT]
            for i in range(0, len(functions), FUNCTIONS_PER_CONTEXT)
        ]
        chunks = [c for c in chunks if len(c) >= 2]
        paragraphs = []
        for k, chunk in enumerate(chunks):
            context, qas = "", []
            for name, args, sentence in chunk:
                line = f"{name}({args}): "
                qas.append({
                    "id": f"{relative}:{name}",
                    "question": f"What does {name} do?",
                    "answers": [{"text": sentence, "answer_start": len(context) + len(line)}],
                    "is_impossible": False,
                })  # fmt: skip
                context += f"{line}{sentence}.\n"
            other = chunks[(k + 1) % len(chunks)] if len(chunks) > 1 else []
            listed = {name for name, _, _ in chunk}
            absent = [name for name, _, _ in other if name not in listed]
            if absent:
                qas.append({
                    "id": f"{relative}:{k}:unanswerable",
                    "question": f"What does {absent[0]} do?",
                    "answers": [],
                    "is_impossible": True,
                })  # fmt: skip
            paragraphs.append({"context": context, "qas": qas})
        if paragraphs:
            split = "dev" if _is_dev(relative, QA_DEV_FRACTION) else "train"
            splits[split].append({"title": relative, "paragraphs": paragraphs})
    os.makedirs(directory, exist_ok=True)
    paths = []
    for split, articles in splits.items():
        paths.append(os.path.join(directory, f"{split}.json"))
        with open(paths[-1] + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"version": "v2.0", "data": articles}, f, indent=1)
        os.replace(paths[-1] + ".tmp", paths[-1])
    return paths[0], paths[1]
