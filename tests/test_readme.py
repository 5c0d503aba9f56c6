"""The README's Python example runs as written (on a tiny model saved where it looks)."""

import re
from pathlib import Path

import numpy as np

import opt_jax

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_api_example(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README lost its Python example"
    target = tmp_path / "path" / "to" / "opt-125m"
    config = opt_jax.OPTConfig(
        vocab_size=300, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2
    )
    opt_jax.save_pretrained(target, config, opt_jax.init_params(config, 0))
    opt_jax.train_tokenizer(["Hello, my name is JAX"] * 10, vocab_size=290).save(target)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(blocks[0], scope)
    assert scope["out"].logits.shape == (2, scope["ids"].shape[1], 300)
    assert np.isfinite(np.asarray(scope["out"].logits)).all()


def test_readme_generation_example():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "opt_jax.generate(" in b)
    scope: dict = {}
    exec(example, scope)
    assert scope["out"].sequences.shape == (2, 25)
