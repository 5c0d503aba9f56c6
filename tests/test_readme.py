"""The README's Python examples run as written, in order, in one namespace (the checkpoint they
load is a tiny model saved where they look)."""

import re
from pathlib import Path

import numpy as np

import opt_jax

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run_in_order(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3, "README lost its Python examples"
    target = tmp_path / "path" / "to" / "opt-125m"
    config = opt_jax.OPTConfig(
        vocab_size=304, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2
    )
    opt_jax.save_pretrained(target, config, opt_jax.init_params(config, 0))
    opt_jax.train_tokenizer(["Hello, my name is JAX"] * 10, vocab_size=290).save(target)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(blocks[0], scope)  # the first example needs no download
    assert scope["logits"].shape == (2, 5, 1000) and np.isfinite(scope["loss"])
    assert scope["out"].sequences.shape == (2, 25)
    for block in blocks[1:]:
        exec(block, scope)
    assert scope["config"].vocab_size == 304  # the "real" checkpoint was loaded
    assert isinstance(scope["texts"][0], str)
