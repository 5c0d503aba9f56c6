"""GenerationConfig is the one list of options: generate(**options), generation_config=, the
script's flags and the compiled programs all derive from it; traced values never recompile."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import assert_trees_equal, ragged_batch, random_tiny_model

import opt_jax
from opt_jax.generation import api
from opt_jax.generation.config import flag_specs, options

CONFIG, MODEL, PARAMS = random_tiny_model(init_std=0.3, noise_seed=7, max_position_embeddings=64)


def test_options_and_generation_config_are_the_same_thing():
    ids, mask = ragged_batch(length=8)
    kwargs = dict(max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.8, seed=3)
    by_kwargs = opt_jax.generate(MODEL, PARAMS, ids, mask, **kwargs)
    cfg = opt_jax.GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.8)
    by_config = opt_jax.generate(MODEL, PARAMS, ids, mask, generation_config=cfg, seed=3)
    np.testing.assert_array_equal(by_kwargs.sequences, by_config.sequences)
    # Keyword options override the config's fields.
    greedy = opt_jax.generate(MODEL, PARAMS, ids, mask, generation_config=cfg, do_sample=False)
    plain = opt_jax.generate(MODEL, PARAMS, ids, mask, max_new_tokens=6)
    np.testing.assert_array_equal(greedy.sequences, plain.sequences)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(temprature=0.5),
            r"unknown generation option 'temprature' \(did you mean 'temperature'\?\)",
        ),
        (dict(suppress_tokens=[5.7]), "suppress_tokens token id must be an integer, got 5.7"),
        (dict(eos_token_id=5.7), "eos_token_id token id must be an integer, got 5.7"),
        (dict(eos_token_id="2"), "eos_token_id expects a token id or a list of token ids"),
        (dict(do_sample="yes"), "do_sample must be True or False, got 'yes'"),
        (dict(temperature="hot"), "temperature must be a number, got 'hot'"),
        (dict(max_new_tokens=None), "max_new_tokens is required"),
    ],
)
def test_option_errors_name_the_option(kwargs, message):
    ids, mask = ragged_batch(length=8)
    kwargs = dict(dict(max_new_tokens=4), **kwargs)
    before = api.TRACE_COUNT["n"]
    with pytest.raises(ValueError, match=message):
        opt_jax.generate(MODEL, PARAMS, ids, mask, **kwargs)
    assert api.TRACE_COUNT["n"] == before


def test_generation_config_checks_on_construction_and_is_frozen():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        opt_jax.GenerationConfig(top_p=2.0)
    cfg = opt_jax.GenerationConfig(top_k=np.int64(5), suppress_tokens=np.array([4, 5]))
    assert cfg.top_k == 5 and type(cfg.top_k) is int and cfg.suppress_tokens == (4, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3
    # Traced values are not part of the program; which processors are on is.
    a = opt_jax.GenerationConfig(do_sample=True, temperature=0.5, top_p=0.9)
    b = opt_jax.GenerationConfig(do_sample=True, temperature=1.5, top_p=0.3)
    c = opt_jax.GenerationConfig(do_sample=True, temperature=1.5)
    assert a.program() == b.program() and hash(a.program()) == hash(b.program())
    assert a.program() != c.program()  # top-p filtering off: another program
    assert a.values()["temperature"] == 0.5 and a.program().temperature is None


def test_script_flags_cover_every_scalar_option():
    names = {spec["name"] for spec in flag_specs()}
    scalar = {f.name for f in options() if f.name not in ("bad_words_ids", "stop_sequences")}
    assert names == scalar


SWEEP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, "tests")
    from conftest import ragged_batch, random_tiny_model
    import opt_jax
    _, model, params = random_tiny_model(init_std=0.3, noise_seed=7, max_position_embeddings=64)
    ids, mask = ragged_batch(length=8)
    out = opt_jax.generate(model, params, ids, mask, max_new_tokens=12, do_sample=True,
                           temperature=0.55, top_p=0.85, repetition_penalty=1.3, seed=11)
    print(json.dumps(out.sequences.tolist()))
    """
)


def test_sweeping_traced_values_never_recompiles_and_matches_a_fresh_process():
    ids, mask = ragged_batch(length=8)
    common = dict(max_new_tokens=12, do_sample=True, seed=11)
    opt_jax.generate(
        MODEL, PARAMS, ids, mask, temperature=0.9, top_p=0.5, repetition_penalty=1.1, **common
    )
    before = api.TRACE_COUNT["n"]
    results = {}
    for temperature in (0.55, 0.7, 1.3):
        for top_p in (0.85, 0.95):
            out = opt_jax.generate(
                MODEL, PARAMS, ids, mask, temperature=temperature, top_p=top_p,
                repetition_penalty=1.3, **common,
            )  # fmt: skip
            results[temperature, top_p] = out.sequences
    assert api.TRACE_COUNT["n"] == before, "a traced value recompiled"
    assert len({r.tobytes() for r in results.values()}) > 1  # the values do reach the program
    fresh = subprocess.run(
        [sys.executable, "-c", SWEEP_SCRIPT], capture_output=True, text=True, check=True,
        timeout=300,
    )  # fmt: skip
    np.testing.assert_array_equal(np.array(json.loads(fresh.stdout)), results[0.55, 0.85])


def test_compile_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(api.PROGRAMS, "size", 2)
    ids, mask = ragged_batch(length=8)
    for k in (3, 4, 5):  # top_k is static: three programs
        opt_jax.generate(MODEL, PARAMS, ids, mask, max_new_tokens=2, do_sample=True, top_k=k)
    assert len(api.PROGRAMS) == 2  # three programs built, the oldest dropped


def test_boxed_parameters_from_flax_init_are_accepted():
    boxed = MODEL.init(jax.random.key(0), np.ones((1, 4), np.int32))["params"]
    plain = nn.unbox(boxed)
    ids, mask = ragged_batch(length=8)
    np.testing.assert_array_equal(
        opt_jax.generate(MODEL, boxed, ids, mask, max_new_tokens=4).sequences,
        opt_jax.generate(MODEL, plain, ids, mask, max_new_tokens=4).sequences,
    )


def test_boxed_parameters_save_in_both_formats(tmp_path):
    from opt_jax.checkpoints import orbax_io

    boxed = MODEL.init(jax.random.key(0), np.ones((1, 4), np.int32))["params"]
    opt_jax.save_pretrained(tmp_path / "hf", CONFIG, boxed)
    orbax_io.save_params(tmp_path / "orbax", CONFIG, boxed)
    for directory in ("hf", "orbax"):
        _, loaded = opt_jax.load_pretrained(tmp_path / directory)
        assert_trees_equal(loaded, nn.unbox(boxed))
