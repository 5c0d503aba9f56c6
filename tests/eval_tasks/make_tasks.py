"""Writes the local lm-eval tasks' data (committed; rerun to regenerate) from the standard
library's own docstrings, so the tasks need no download:

  mc.jsonl    which of four one-line docstrings belongs to a function signature (4 choices)
  docs.jsonl  short module docstrings, for rolling perplexity
  gen.jsonl   a docstring's first line continued from its first two words (exact match)

  python tests/eval_tasks/make_tasks.py
"""

import ast
import json
import random
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "shlex.py",
           "fnmatch.py", "glob.py", "base64.py", "calendar.py", "difflib.py", "heapq.py",
           "bisect.py", "copy.py", "csv.py", "gettext.py", "locale.py", "ntpath.py",
           "posixpath.py", "pprint.py", "quopri.py", "random.py", "statistics.py"]  # fmt: skip


def functions():
    library = Path(sysconfig.get_paths()["stdlib"])
    for name in MODULES:
        path = library / name
        if not path.exists():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc and 20 <= len(doc.splitlines()[0]) <= 80 and not node.name.startswith("_"):
                args = ", ".join(a.arg for a in node.args.args)
                yield f'def {node.name}({args}):\n    """', doc.splitlines()[0].strip()


def main():
    rng = random.Random(0)
    items = list(dict(functions()).items())
    rng.shuffle(items)
    items = items[:100]
    docs = [d for _, d in items]
    with open(HERE / "mc.jsonl", "w") as f:
        for signature, doc in items:
            wrong = rng.sample([d for d in docs if d != doc], 3)
            choices = wrong + [doc]
            rng.shuffle(choices)
            f.write(json.dumps({"question": signature, "choices": choices,
                                "answer": choices.index(doc)}) + "\n")  # fmt: skip
    library = Path(sysconfig.get_paths()["stdlib"])
    with open(HERE / "docs.jsonl", "w") as f:
        for name in MODULES[:12]:
            path = library / name
            if not path.exists():
                continue
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            if doc:
                f.write(json.dumps({"text": doc[:1500]}) + "\n")
    with open(HERE / "gen.jsonl", "w") as f:
        for signature, doc in items[:20]:
            words = doc.split()
            prompt, rest = signature + " ".join(words[:2]), " " + " ".join(words[2:])
            f.write(json.dumps({"prompt": prompt, "target": rest}) + "\n")


if __name__ == "__main__":
    main()
