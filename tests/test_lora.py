"""LoRA in PEFT's layout, checked against `peft` on transformers' OPT: our adapter loads in
PEFT with our logits, PEFT's adapter loads in ours with PEFT's logits, merging changes nothing,
a fresh adapter is the base model, and bad adapters are named."""

import json

import jax
import numpy as np
import pytest
import torch
from conftest import make_hf_model, max_rel_diff, ragged_batch, save_hf

import opt_jax
from opt_jax import lora

TOL = 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    hf = make_hf_model("post_ln_project")  # project_in/out and post-LN: the odd variant
    directory = save_hf(hf, tmp_path_factory.mktemp("base"))
    config, params = opt_jax.load_pretrained(directory)
    return hf, directory, config, params


def _trained_adapter(config, params, **lora_fields):
    """Adapters with non-zero B (as after training), so they change the logits."""
    config = config.replace(lora_rank=4, lora_alpha=8.0, **lora_fields)
    adapted = lora.add_adapters(config, params, seed=1)
    base, adapters = lora.split(adapted)
    keys = jax.random.split(jax.random.key(2), len(jax.tree.leaves(adapters)))
    leaves, tree = jax.tree.flatten(adapters)
    leaves = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return config, lora.combine(base, jax.tree.unflatten(tree, leaves))


def _ours(config, params, ids, mask):
    return opt_jax.OPTForCausalLM(config).apply({"params": params}, ids, attention_mask=mask).logits


def test_a_fresh_adapter_is_the_base_model(base):
    _, _, config, params = base
    ids, mask = ragged_batch()
    fresh = config.replace(lora_rank=8)
    adapted = lora.add_adapters(fresh, params)
    np.testing.assert_array_equal(
        _ours(fresh, adapted, ids, mask), _ours(config, params, ids, mask)
    )
    shapes = jax.tree.map(lambda x: x.shape, lora.split(adapted)[1])
    q = shapes["model"]["decoder"]["layers_0"]["self_attn"]["q_proj"]
    assert q == {"lora_A": (16, 8), "lora_B": (8, 4, 4)}
    assert set(shapes["model"]["decoder"]["layers_0"]["self_attn"]) == {"q_proj", "v_proj"}


def test_our_adapter_in_peft_gives_our_logits_and_merging_changes_nothing(base, tmp_path):
    import peft

    hf, directory, config, params = base
    ids, mask = ragged_batch()
    config_a, adapted = _trained_adapter(config, params)
    ours = _ours(config_a, adapted, ids, mask)
    assert max_rel_diff(ours, _ours(config, params, ids, mask)) > 1e-3  # the adapter matters
    lora.save_adapter(tmp_path / "adapter", config_a, adapted)
    spec = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert spec["target_modules"] == ["q_proj", "v_proj"] and spec["r"] == 4
    model = peft.PeftModel.from_pretrained(make_hf_model("post_ln_project"), tmp_path / "adapter")
    model.load_state_dict(hf.state_dict(), strict=False)  # the same base weights
    model.eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert max_rel_diff(ours, theirs.numpy(), mask == 1) <= TOL
    merged_config, merged = lora.merge(config_a, adapted)
    assert merged_config.lora_rank == 0 and not lora.split(merged)[1]
    assert max_rel_diff(_ours(merged_config, merged, ids, mask), ours) <= 1e-5
    # The merged model exports as a plain OPT that transformers reads with the same logits.
    opt_jax.save_pretrained(tmp_path / "merged", merged_config, merged)
    import transformers

    exported = transformers.OPTForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        again = exported(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert max_rel_diff(ours, again.numpy(), mask == 1) <= TOL


def test_a_peft_adapter_loads_into_ours(base, tmp_path):
    import peft

    hf, directory, config, _ = base
    ids, mask = ragged_batch()
    peft_config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "fc2"],
                                  lora_dropout=0.0, task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(make_hf_model("post_ln_project"), peft_config)
    model.base_model.model.load_state_dict(hf.state_dict(), strict=False)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    model.eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    model.save_pretrained(tmp_path / "peft")
    adapted_config, adapted = opt_jax.load_pretrained(directory, adapter=tmp_path / "peft")
    assert adapted_config.lora_rank == 2 and adapted_config.lora_alpha == 5
    assert max_rel_diff(_ours(adapted_config, adapted, ids, mask), theirs.numpy(), mask == 1) <= TOL
    # The same adapter into the scan_layers layout, and generate with unmerged adapters.
    scanned_config, scanned = opt_jax.load_pretrained(
        directory, adapter=tmp_path / "peft", scan_layers=True
    )
    np.testing.assert_allclose(
        _ours(scanned_config, scanned, ids, mask), _ours(adapted_config, adapted, ids, mask),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    # generate samples with unmerged adapters: its first token is the adapted model's argmax.
    out = opt_jax.generate(opt_jax.OPTForCausalLM(adapted_config), adapted, ids, mask,
                           max_new_tokens=2)  # fmt: skip
    last = np.asarray(_ours(adapted_config, adapted, ids, mask))[:, -1]
    np.testing.assert_array_equal(out.sequences[:, ids.shape[1]], last.argmax(-1))


def test_bad_adapters_are_named(base, tmp_path):
    _, directory, config, params = base
    config_a, adapted = _trained_adapter(config, params)
    lora.save_adapter(tmp_path / "a", config_a, adapted)
    # An adapter for a different base (wider model): shapes do not fit.
    other = make_hf_model("pre_ln", hidden_size=24, num_attention_heads=4)
    other_dir = save_hf(other, tmp_path / "other")
    with pytest.raises(
        ValueError, match=r"q_proj.lora_A is \(4, 16\), this base with r=4 needs \(4, 24\)"
    ):
        opt_jax.load_pretrained(other_dir, adapter=tmp_path / "a")
    spec = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    spec["use_rslora"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="use_rslora=true is not supported"):
        opt_jax.load_pretrained(directory, adapter=tmp_path / "a")
    with pytest.raises(ValueError, match="merge them first"):
        opt_jax.save_pretrained(tmp_path / "x", config_a, adapted)
    with pytest.raises(ValueError, match="lora_rank must be an integer >= 0"):
        config.replace(lora_rank=-1)


def _train_lora(tmp_path, overrides: dict):
    """Trains 4 LoRA steps (rank 4) from a tiny HF base in tmp_path/base, evaluating after every
    step (step 1's learning rate is 0 in the warmup: its eval_loss is the base model's).

    Returns:
      (the base's float params, the workdir, the restored final train state)
    """
    import orbax.checkpoint as ocp
    from train_helpers import tiny_train_config

    from opt_jax.checkpoints import orbax_io
    from opt_jax.training import train

    base_config = opt_jax.OPTConfig(vocab_size=304, hidden_size=32, num_hidden_layers=2,
                                    ffn_dim=64, num_attention_heads=2, max_position_embeddings=64,
                                    dropout=0.0)  # fmt: skip
    base_params = opt_jax.init_params(base_config, 0)
    opt_jax.save_pretrained(tmp_path / "base", base_config, base_params)
    opt_jax.train_tokenizer(["def f(x):\n    return x + 1\n"] * 50, 300).save(tmp_path / "base")
    config = tiny_train_config(
        **{"lora.rank": 4, "lora.alpha": 8.0, "num_train_steps": 4, "eval_every_steps": 1,
           "checkpoint_every_steps": 4, "init_from": str(tmp_path / "base"), **overrides}
    )  # fmt: skip
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim",
                "num_attention_heads", "max_position_embeddings"):  # fmt: skip
        config.model[key] = None  # the architecture comes from init_from
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, workdir)
    ckpts = orbax_io.TrainCheckpoints(workdir, keep=2)
    state = ckpts.manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    ckpts.close()
    return base_params, workdir, state


def _assert_adapters_trained(workdir, adapters):
    """Every lora_B left its zero init (lora_A starts random, so "non-zero adapters" holds
    before any step), and the held-out loss fell from the base model's."""
    from opt_jax.training.metrics import read_metrics

    paths = jax.tree_util.tree_leaves_with_path(adapters)
    b = {jax.tree_util.keystr(p): x for p, x in paths if p[-1].key == "lora_B"}
    assert len(b) == len(paths) // 2 > 0, list(b)
    unmoved = [name for name, x in b.items() if not np.abs(np.asarray(x)).max() > 0]
    assert not unmoved, unmoved
    evals = [r["eval_loss"] for r in read_metrics(workdir) if "eval_loss" in r]
    assert len(evals) == 4 and evals[-1] < evals[0], evals


def test_lora_training_updates_only_adapters_and_exports_both(tmp_path):
    """scripts/train.py with lora.rank: the base stays bitwise, only adapters hold Adam state,
    WORKDIR/adapter (PEFT) on the base equals WORKDIR/export (merged)."""
    base_params, workdir, state = _train_lora(tmp_path, {"data.tokenizer": str(tmp_path / "base")})
    trained_base, adapters = lora.split(state["state"]["params"])
    from conftest import assert_trees_equal

    assert_trees_equal(trained_base, base_params)  # frozen, bitwise
    _assert_adapters_trained(workdir, adapters)
    moments = [x for x in jax.tree.leaves(state["state"]["opt_state"]) if np.ndim(x) > 0]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(adapters))
    ids = np.array([[2, 5, 9, 14, 33, 7]])
    adapted_config, adapted = opt_jax.load_pretrained(
        tmp_path / "base", adapter=workdir / "adapter"
    )
    merged_config, merged = opt_jax.load_pretrained(workdir / "export")
    assert merged_config.lora_rank == 0
    np.testing.assert_allclose(
        _ours(adapted_config, adapted, ids, None), _ours(merged_config, merged, ids, None),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_qlora_trains_adapters_on_a_frozen_int8_base(tmp_path):
    """lora.quantize_base=int8: the base is quantised once and stays bitwise frozen, only the
    adapters train and hold Adam state; the export (quantised base + unmerged adapters) equals
    the base loaded with quantize="int8" plus WORKDIR/adapter."""
    from conftest import assert_trees_equal

    _, workdir, state = _train_lora(
        tmp_path, {"lora.quantize_base": "int8", "optim.learning_rate": 1e-2}
    )
    trained_base, adapters = lora.split(state["state"]["params"])
    _, quantized = opt_jax.load_pretrained(tmp_path / "base", quantize="int8")
    assert_trees_equal(trained_base, quantized)  # int8 kernels and scales untouched
    _assert_adapters_trained(workdir, adapters)
    moments = [x for x in jax.tree.leaves(state["state"]["opt_state"]) if np.ndim(x) > 0]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(adapters))
    exported_config, exported = opt_jax.load_pretrained(workdir / "export")
    assert exported_config.quantization == "int8" and exported_config.lora_rank == 4
    again_config, again = opt_jax.load_pretrained(
        tmp_path / "base", quantize="int8", adapter=workdir / "adapter"
    )
    ids = np.array([[2, 5, 9, 14, 33, 7]])
    np.testing.assert_allclose(
        _ours(exported_config, exported, ids, None), _ours(again_config, again, ids, None),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    with pytest.raises(ValueError, match="adapters cannot be folded into its integer kernels"):
        lora.merge(exported_config, exported)
