"""Checkpoint layouts users have, HF round trips and clear errors for mismatched checkpoints."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import BASE, assert_trees_equal, ragged_batch
from safetensors.numpy import load_file, save_file

import opt_jax
from opt_jax.checkpoints.hf import CheckpointError


def _logits(directory, ids, mask):
    config, params = opt_jax.load_pretrained(directory)
    return np.asarray(
        opt_jax.model_for(config).apply({"params": params}, ids, attention_mask=mask).logits
    )


def _reference(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).logits.numpy()


def _write_bin(directory, state, config_dir, shards=1):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(config_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    keys = list(state)
    if shards == 1:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
        return
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({keys[j]: state[keys[j]] for j in part}, os.path.join(directory, name))
        weight_map.update({keys[j]: name for j in part})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_every_layout_loads(hf_dir, tmp_path):
    hf_model, directory = hf_dir("post_ln_project")
    ids, mask = ragged_batch(side="right")
    ref = _reference(hf_model, ids, mask)
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}

    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1

    _write_bin(tmp_path / "bin", state, directory)
    _write_bin(tmp_path / "bin_sharded", state, directory, shards=3)
    # The original facebook/opt-* files: `decoder.*` keys, no lm_head, float16 storage.
    original = {
        k.removeprefix("model."): v.half() for k, v in state.items() if k != "lm_head.weight"
    }
    _write_bin(tmp_path / "original_fp16", original, directory)

    for layout in ("sharded", "bin", "bin_sharded"):
        np.testing.assert_allclose(_logits(tmp_path / layout, ids, mask), ref, rtol=0, atol=1e-4)
    # Half-precision storage is cast to the configured param dtype on load.
    config, params = opt_jax.load_pretrained(
        tmp_path / "original_fp16", param_dtype="float32", dtype="float32"
    )
    assert params["model"]["decoder"]["embed_tokens"]["embedding"].dtype == jnp.float32
    emb = state["model.decoder.embed_tokens.weight"].half().float().numpy()
    np.testing.assert_array_equal(params["model"]["decoder"]["embed_tokens"]["embedding"], emb)


def test_bfloat16_safetensors_and_bare_decoder(hf_dir, tmp_path):
    hf_model, _ = hf_dir("pre_ln")
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config, params = opt_jax.load_pretrained(tmp_path / "bf16")
    assert config.param_dtype == "bfloat16"
    assert params["model"]["decoder"]["layers_0"]["fc1"]["kernel"].dtype == jnp.bfloat16
    config32, params32 = opt_jax.load_pretrained(
        tmp_path / "bf16", param_dtype="float32", dtype="float32"
    )
    expected = hf_model.model.decoder.layers[0].fc1.weight.detach().float().numpy().T
    np.testing.assert_array_equal(
        params32["model"]["decoder"]["layers_0"]["fc1"]["kernel"], expected
    )
    # The same file read as a bare decoder (OPTModel): parameters rooted at `decoder`.
    config, params = opt_jax.load_pretrained(tmp_path / "bf16", architecture="OPTModel")
    assert set(params) == {"decoder"}


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_project", "no_bias", "non_affine_ln"])
@pytest.mark.parametrize(
    "head", ["OPTForCausalLM", "OPTForSequenceClassification", "OPTForQuestionAnswering"]
)
def test_hf_round_trip_is_bitwise(hf_dir, tmp_path, variant, head):
    hf_model, directory = hf_dir(variant, head)
    config, params = opt_jax.load_pretrained(directory)
    out = tmp_path / "export"
    opt_jax.save_pretrained(out, config, params)
    original, exported = (
        load_file(os.path.join(directory, "model.safetensors")),
        load_file(out / "model.safetensors"),
    )
    assert set(exported) == set(original)  # same keys: the tied lm_head is not duplicated
    for key in original:
        assert exported[key].dtype == original[key].dtype, key
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)

    reloaded, info = getattr(transformers, head).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask = ragged_batch(side="right")
    with torch.no_grad():
        a = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        b = reloaded.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    for name in ("logits", "start_logits", "end_logits"):
        if getattr(a, name, None) is not None:
            np.testing.assert_array_equal(getattr(a, name).numpy(), getattr(b, name).numpy())


def test_sharded_export_reloads(hf_dir, tmp_path):
    hf_model, directory = hf_dir("pre_ln")
    config, params = opt_jax.load_pretrained(directory)
    opt_jax.save_pretrained(tmp_path / "out", config, params, max_shard_bytes=20_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert not list((tmp_path / "out").glob("*.tmp"))
    reloaded = transformers.OPTForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = ragged_batch(side="right")
    np.testing.assert_array_equal(_reference(reloaded, ids, mask), _reference(hf_model, ids, mask))


def _tamper(directory, tmp_path, edit):
    state = load_file(os.path.join(directory, "model.safetensors"))
    edit(state)
    out = tmp_path / "tampered"
    out.mkdir(exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    return out


def test_bad_checkpoints_name_the_tensor(hf_dir, tmp_path):
    _, directory = hf_dir("pre_ln")
    out = _tamper(directory, tmp_path, lambda s: s.pop("model.decoder.layers.1.fc2.bias"))
    with pytest.raises(
        CheckpointError, match=r"missing tensors: model\.decoder\.layers\.1\.fc2\.bias"
    ):
        opt_jax.load_pretrained(out)
    out = _tamper(
        directory,
        tmp_path,
        lambda s: s.update({"model.decoder.extra.weight": np.zeros(3, np.float32)}),
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.decoder\.extra\.weight"):
        opt_jax.load_pretrained(out)
    out = _tamper(
        directory,
        tmp_path,
        lambda s: s.update({"model.decoder.layers.0.fc1.weight": np.zeros((36, 16), np.float32)}),
    )
    with pytest.raises(
        CheckpointError,
        match=r"layers\.0\.fc1\.weight has shape \(36, 16\), the config expects \(37, 16\)",
    ):
        opt_jax.load_pretrained(out)
    with pytest.raises(FileNotFoundError, match="no weights in"):
        os.remove(out / "model.safetensors")
        opt_jax.load_pretrained(out)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_bin_files_cannot_run_code(hf_dir, tmp_path, monkeypatch):
    _, directory = hf_dir("pre_ln")
    monkeypatch.chdir(tmp_path)
    _write_bin(tmp_path / "evil", {"model.decoder.x": _Exploit()}, directory)
    # The pickle's call to os.system is unpickled as an inert record, never made.
    with pytest.raises(opt_jax.CheckpointError, match=r"entry 'model\.decoder\.x' is not a tensor"):
        opt_jax.load_pretrained(tmp_path / "evil")
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_truncated_safetensors_is_an_error(hf_dir, tmp_path):
    _, directory = hf_dir("pre_ln")
    out = tmp_path / "cut"
    out.mkdir()
    data = open(os.path.join(directory, "model.safetensors"), "rb").read()
    (out / "model.safetensors").write_bytes(data[: len(data) - 100])
    (out / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    with pytest.raises(CheckpointError, match="is truncated inside tensor"):
        opt_jax.load_pretrained(out)


def test_saving_over_an_earlier_save_leaves_only_the_new_weights(tmp_path):
    """Sharded then single-file then sharded again into one directory: opt_jax and transformers
    both load the latest weights each time, and no stale weight file is left behind."""
    import transformers

    config = opt_jax.OPTConfig(**{k: v for k, v in BASE.items() if k != "init_std"})
    saves = [
        (opt_jax.init_params(config, seed), shard)
        for seed, shard in ((0, 4000), (1, None), (2, 3000))
    ]
    for params, shard in saves:
        opt_jax.save_pretrained(tmp_path, config, params, max_shard_bytes=shard)
        names = sorted(os.listdir(tmp_path))
        if shard:
            assert "model.safetensors" not in names and "model.safetensors.index.json" in names
            index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
            shards = sorted(n for n in names if n.startswith("model-"))
            assert shards == sorted(set(index["weight_map"].values()))
        else:
            assert [n for n in names if n.startswith("model")] == ["model.safetensors"]
        _, loaded = opt_jax.load_pretrained(tmp_path)
        assert_trees_equal(loaded, params)
        hf = transformers.OPTForCausalLM.from_pretrained(tmp_path)
        embed = params["model"]["decoder"]["embed_tokens"]["embedding"]
        np.testing.assert_array_equal(hf.model.decoder.embed_tokens.weight.detach().numpy(), embed)
