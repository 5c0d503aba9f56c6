"""torch_reader (torch files read with numpy, no pickled code run) and metaseq checkpoints."""

import argparse
import collections
import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
import torch
from conftest import assert_trees_equal, make_hf_model, max_rel_diff, ragged_batch

import opt_jax
from opt_jax.checkpoints import torch_reader
from opt_jax.checkpoints.metaseq import infer_config, load_metaseq


def _numpy(t):
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(torch_reader._STORAGE_DTYPES["BFloat16Storage"])
    return t.numpy()


def test_reads_what_torch_load_reads(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = collections.OrderedDict(
        f32=torch.randn(3, 5), f16=torch.randn(7).half(), bf16=torch.randn(2, 3).bfloat16(),
        f64=torch.randn(2).double(), i64=torch.arange(5), i32=torch.arange(3).int(),
        i8=torch.arange(4).to(torch.int8), u8=torch.arange(4).to(torch.uint8),
        boolean=torch.tensor([True, False]), scalar=torch.tensor(3.5), empty=torch.zeros(0, 4),
        transposed=base.t(), sliced=base[1:3, 2:5], strided=base[::2, ::3], shared=base,
        parameter=torch.nn.Parameter(torch.ones(2)),
    )  # fmt: skip
    path = tmp_path / "t.pt"
    torch.save({"model": state, "cfg": argparse.Namespace(layers=2), "notes": [1, "x"]}, path)
    obj = torch_reader.load(path)
    assert obj["notes"] == [1, "x"]
    assert isinstance(obj["cfg"], torch_reader.Opaque) and obj["cfg"].state == {"layers": 2}
    ref = torch.load(path, weights_only=False)["model"]
    assert list(obj["model"]) == list(ref)
    for key, lazy in obj["model"].items():
        assert isinstance(lazy, torch_reader.TensorRef), key
        ours, want = lazy.read(), _numpy(ref[key])
        assert ours.dtype == want.dtype and ours.shape == want.shape, key
        np.testing.assert_array_equal(ours, want)
        assert ours.flags.c_contiguous and ours.flags.writeable, key


def test_pickled_code_is_never_run(tmp_path, monkeypatch):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch pwned_by_pickle",))

    monkeypatch.chdir(tmp_path)
    torch.save({"model": {"w": torch.ones(2)}, "cfg": Exploit()}, tmp_path / "evil.pt")
    obj = torch_reader.load(tmp_path / "evil.pt")
    assert isinstance(obj["cfg"], torch_reader.Opaque)
    assert obj["cfg"].args == ("touch pwned_by_pickle",)  # recorded, not called
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_bad_files_are_named(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a zip at all")
    with pytest.raises(torch_reader.TorchFileError, match="junk.pt is not a zip-format torch"):
        torch_reader.load(tmp_path / "junk.pt")
    torch.save({"w": torch.ones(1000)}, tmp_path / "cut.pt")
    # Chop the storage entry short but keep the zip directory readable.
    with (
        zipfile.ZipFile(tmp_path / "cut.pt") as src,
        zipfile.ZipFile(tmp_path / "short.pt", "w", zipfile.ZIP_STORED) as dst,
    ):
        for info in src.infolist():
            payload = src.read(info)
            dst.writestr(info.filename, payload[:100] if "/data/0" in info.filename else payload)
    lazy = torch_reader.load(tmp_path / "short.pt")["w"]
    with pytest.raises(torch_reader.TorchFileError, match="truncated"):
        lazy.read()


def test_bin_checkpoints_load_without_torch(tmp_path):
    """pytorch_model.bin needs no PyTorch: a subprocess where `import torch` fails loads one."""
    model = make_hf_model("pre_ln")
    directory = tmp_path / "bin"
    model.save_pretrained(directory)
    os.remove(directory / "model.safetensors")
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    ids, mask = ragged_batch()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np, opt_jax
config, params = opt_jax.load_pretrained({str(directory)!r})
ids, mask = np.load({str(tmp_path / "ids.npy")!r}), np.load({str(tmp_path / "mask.npy")!r})
logits = opt_jax.OPTForCausalLM(config).apply({{"params": params}}, ids, mask).logits
np.save({str(tmp_path / "out.npy")!r}, np.asarray(logits))
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = np.load(tmp_path / "out.npy")
    assert max_rel_diff(ours, ref, mask.astype(bool)) < 1e-5


def _metaseq_state(hf_model, num_layers):
    """A metaseq-layout state dict made from an HF OPTForCausalLM: fused K,V,Q, metaseq names,
    the tied output projection and the version marker."""
    hf = {k: v.clone() for k, v in hf_model.state_dict().items()}
    out = collections.OrderedDict()
    renames = {
        "model.decoder.project_in.weight": "decoder.project_in_dim.weight",
        "model.decoder.project_out.weight": "decoder.project_out_dim.weight",
        "model.decoder.final_layer_norm.weight": "decoder.layer_norm.weight",
        "model.decoder.final_layer_norm.bias": "decoder.layer_norm.bias",
        "lm_head.weight": "decoder.output_projection.weight",
    }
    for key, value in hf.items():
        if any(f".self_attn.{p}_proj." in key for p in "qkv"):
            continue
        out[renames.get(key, key.removeprefix("model."))] = value
    for i in range(num_layers):
        for leaf in ("weight", "bias"):
            parts = [hf[f"model.decoder.layers.{i}.self_attn.{p}_proj.{leaf}"] for p in "kvq"]
            out[f"decoder.layers.{i}.self_attn.qkv_proj.{leaf}"] = torch.cat(parts, 0)
    out["decoder.version"] = torch.tensor([3.0])
    return out


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_project"])
def test_metaseq_checkpoint_matches_transformers(tmp_path, variant):
    hf_model = make_hf_model(variant)
    state = _metaseq_state(hf_model, hf_model.config.num_hidden_layers)
    path = tmp_path / "restored.pt"
    torch.save({"model": state, "cfg": argparse.Namespace(arch="transformer_lm")}, path)
    ours_config = opt_jax.OPTConfig.from_hf(_save_config(hf_model, tmp_path))
    config, params = load_metaseq(path, ours_config)
    assert config.dtype == "float32" and config.architecture == "OPTForCausalLM"
    ids, mask = ragged_batch()
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    ours = opt_jax.OPTForCausalLM(config).apply({"params": params}, ids, mask).logits
    assert max_rel_diff(ours, ref.numpy(), mask.astype(bool)) < 1e-5
    # The same weights as the HF checkpoint, bit for bit (q/k/v came back out of K, V, Q).
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    _, hf_params = opt_jax.load_pretrained(hf_dir)
    assert jax.tree.structure(params) == jax.tree.structure(hf_params)
    assert_trees_equal(params, hf_params)
    # A directory holding the one file works too; the bare decoder as well.
    config, params = load_metaseq(tmp_path, ours_config, architecture="OPTModel")
    assert config.architecture == "OPTModel" and list(params) == ["decoder"]


def _save_config(hf_model, tmp_path):
    directory = tmp_path / "config_only"
    hf_model.config.save_pretrained(directory)
    return directory


def test_metaseq_config_is_inferred_from_a_preset_shape(tmp_path):
    """Only a preset's exact shapes are accepted without a config."""
    hf_model = make_hf_model("pre_ln")
    torch.save({"model": _metaseq_state(hf_model, 2)}, tmp_path / "m.pt")
    with pytest.raises(opt_jax.CheckpointError, match="match no OPT preset.*pass config="):
        load_metaseq(tmp_path / "m.pt")
    # The real 125m's shapes (no 500 MB of weights written) -> the 125m preset.
    shapes = {"decoder.embed_tokens.weight": (50272, 768),
              "decoder.embed_positions.weight": (2050, 768)}  # fmt: skip
    for i in range(12):
        shapes[f"decoder.layers.{i}.fc1.weight"] = (3072, 768)
    assert infer_config(shapes, "x") == opt_jax.preset("125m")
    shapes["decoder.project_in_dim.weight"] = (768, 768)
    shapes["decoder.embed_tokens.weight"] = (50272, 512)
    with pytest.raises(opt_jax.CheckpointError, match="match no OPT preset"):
        infer_config(shapes, "x")


def test_metaseq_errors_name_the_problem(tmp_path):
    hf_model = make_hf_model("pre_ln")
    state = _metaseq_state(hf_model, 2)
    config = opt_jax.OPTConfig.from_hf(_save_config(hf_model, tmp_path))
    parts = tmp_path / "parts"
    parts.mkdir()
    for k in range(2):
        torch.save({"model": state}, parts / f"reshard-model_part-{k}-shard{k}.pt")
    with pytest.raises(opt_jax.CheckpointError, match="unconsolidated metaseq checkpoint"):
        load_metaseq(parts, config)
    torch.save({"model": {"flat_param_0": torch.ones(10)}}, tmp_path / "fsdp.pt")
    with pytest.raises(opt_jax.CheckpointError, match="FSDP shard"):
        load_metaseq(tmp_path / "fsdp.pt", config)
    bad = dict(state)
    bad["decoder.layers.1.self_attn.qkv_proj.weight"] = torch.ones(47, 16)
    torch.save({"model": bad}, tmp_path / "bad.pt")
    with pytest.raises(opt_jax.CheckpointError, match="qkv_proj.weight has 47 rows"):
        load_metaseq(tmp_path / "bad.pt", config)
    del bad["decoder.layers.1.self_attn.qkv_proj.weight"]
    torch.save({"model": bad}, tmp_path / "missing.pt")
    with pytest.raises(
        opt_jax.CheckpointError, match="missing tensors: .*layers.1.self_attn.q_proj"
    ):
        load_metaseq(tmp_path / "missing.pt", config)


def _split_parts(state, parts):
    """Model-parallel parts of a consolidated metaseq state dict, split as metaseq's
    reshard_megatron_parts splits them (written independently of the loader's rules): each
    part's qkv_proj holds its share of K, then of V, then of Q; fc1 and the token table by rows;
    fc2 and out_proj weights by columns; everything else replicated."""
    out = [collections.OrderedDict() for _ in range(parts)]
    for key, value in state.items():
        if ".qkv_proj." in key:
            k, v, q = (torch.chunk(t, parts) for t in torch.split(value, value.shape[0] // 3))
            pieces = [torch.cat([k[i], v[i], q[i]]) for i in range(parts)]
        elif ".fc1." in key or key.endswith(("embed_tokens.weight", "output_projection.weight")):
            pieces = torch.chunk(value, parts, dim=0)
        elif key.endswith(("fc2.weight", "out_proj.weight")):
            pieces = torch.chunk(value, parts, dim=1)
        else:
            pieces = [value] * parts
        for i, piece in enumerate(pieces):
            out[i][key] = piece.clone()
    return out


def _write_parts(directory, state, parts):
    directory.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(_split_parts(state, parts)):
        torch.save({"model": part}, directory / f"reshard-model_part-{k}.pt")
    return directory


# ffn and vocabulary sizes that 2 and 4 parts divide (metaseq splits evenly)
EVEN = dict(ffn_dim=36, vocab_size=100)


@pytest.mark.parametrize("variant, parts", [("pre_ln", 2), ("post_ln_project", 4)])
def test_model_parallel_parts_equal_the_consolidated_checkpoint(tmp_path, variant, parts):
    hf_model = make_hf_model(variant, **EVEN)
    state = _metaseq_state(hf_model, hf_model.config.num_hidden_layers)
    torch.save({"model": state}, tmp_path / "restored.pt")
    config = opt_jax.OPTConfig.from_hf(_save_config(hf_model, tmp_path))
    _, whole = load_metaseq(tmp_path / "restored.pt", config)
    directory = _write_parts(tmp_path / "parts", state, parts)
    _, merged = load_metaseq(directory, config)
    assert_trees_equal(merged, whole)  # bit for bit
    _, globbed = load_metaseq(str(directory / "reshard-model_part-*.pt"), config)
    assert_trees_equal(globbed, whole)


def test_model_parallel_part_errors_name_the_file(tmp_path):
    hf_model = make_hf_model("pre_ln", **EVEN)
    state = _metaseq_state(hf_model, 2)
    config = opt_jax.OPTConfig.from_hf(_save_config(hf_model, tmp_path))
    three = _write_parts(tmp_path / "three", state, 2)
    torch.save({"model": _split_parts(state, 2)[0]}, three / "reshard-model_part-3.pt")
    with pytest.raises(opt_jax.CheckpointError, match=r"missing model part\(s\) \[2\] of 4"):
        load_metaseq(three, config)
    mixed = _write_parts(tmp_path / "mixed", state, 2)
    torch.save({"model": _split_parts(state, 4)[1]}, mixed / "reshard-model_part-1.pt")
    with pytest.raises(opt_jax.CheckpointError, match=r"reshard-model_part-1.pt: decoder\..* has "
                       r"shape \(\d+, \d+\), part 0 has"):  # fmt: skip
        load_metaseq(mixed, config)
    other = _write_parts(tmp_path / "other", state, 2)
    part = _split_parts(state, 2)[1]
    del part["decoder.layers.1.fc2.bias"]
    torch.save({"model": part}, other / "reshard-model_part-1.pt")
    with pytest.raises(opt_jax.CheckpointError, match="part-1.pt does not hold the tensors of"):
        load_metaseq(other, config)


def test_convert_script_turns_a_metaseq_file_into_an_hf_directory(tmp_path):
    """scripts/convert.py --src_format metaseq: transformers loads the result with the logits
    of the model the metaseq file was made from."""
    import transformers

    hf_model = make_hf_model("post_ln_project", **EVEN)
    torch.save({"model": _metaseq_state(hf_model, 2)}, tmp_path / "restored.pt")
    config_dir = _save_config(hf_model, tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def convert(*extra):
        return subprocess.run(
            [sys.executable, "scripts/convert.py", "--src_format", "metaseq",
             "--src", str(tmp_path / "restored.pt"), "--to", "hf", "--dst", str(tmp_path / "out"),
             *extra],
            cwd=root, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    proc = convert()  # a tiny shape is no preset: the config must be given
    assert proc.returncode == 2 and "match no OPT preset" in proc.stderr
    assert not (tmp_path / "out").exists()
    renamed = tmp_path / "my_opt.json"  # a config file under any name
    renamed.write_text((config_dir / "config.json").read_text())
    proc = convert("--model_config", str(renamed))
    assert proc.returncode == 0, proc.stderr[-2000:]
    reloaded = transformers.OPTForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = ragged_batch()
    with torch.no_grad():
        a = reloaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        b = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The model-parallel parts of the same model (OPT-13b and up's release layout) as well.
    _write_parts(tmp_path / "parts", _metaseq_state(hf_model, 2), 2)
    proc = subprocess.run(
        [sys.executable, "scripts/convert.py", "--src_format", "metaseq", "--src",
         str(tmp_path / "parts"), "--to", "hf", "--dst", str(tmp_path / "from_parts"),
         "--model_config", str(renamed)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    reloaded = transformers.OPTForCausalLM.from_pretrained(tmp_path / "from_parts").eval()
    with torch.no_grad():
        c = reloaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    np.testing.assert_array_equal(c.numpy(), b.numpy())


def test_views_that_could_leave_their_storage_are_refused(tmp_path):
    torch.save({"w": torch.ones(4)}, tmp_path / "w.pt")
    reader = torch_reader.TorchFile(tmp_path / "w.pt")
    storage = torch_reader._StorageRef("0", np.float32, 4)
    for offset, shape, stride in ((0, (4,), (-1,)), (0, (-2,), (1,)), (-1, (2,), (1,)),
                                  (0, (2, 2), (1,))):  # fmt: skip
        with pytest.raises(torch_reader.TorchFileError, match="tensor view|negative"):
            torch_reader.TensorRef(reader, storage, offset, shape, stride)
    with pytest.raises(torch_reader.TorchFileError, match="reaches past the end"):
        torch_reader.TensorRef(reader, storage, 2, (4,), (1,)).read()


def _hand_made_torch_file(path, pickle_bytes):
    """A torch zip file with the given data.pkl and one storage of 8 float32 (0..7)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/data/0", np.arange(8, dtype=np.float32).tobytes())


def _rebuild_tensor_pickle(shape_stride: bytes, then: bytes = b"") -> bytes:
    """Protocol-2 opcodes for _rebuild_tensor_v2(<storage 0: 8 floats>, 0, shape, stride, False,
    {}), followed by `then`."""
    storage = (b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000"
               b"X\x03\x00\x00\x00cpuK\x08tQ")  # fmt: skip
    call = b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"K\x00" + shape_stride
    return b"\x80\x02" + call + b"\x89}tR" + then + b"."


def test_a_pickle_cannot_rewrite_a_checked_view(tmp_path):
    """A BUILD opcode after the tensor is rebuilt could set a stride that reads outside the
    buffer (as_strided); it is refused, as is such a stride given directly."""
    ok = b"K\x02K\x04\x86K\x04K\x01\x86"  # shape (2, 4), stride (4, 1)
    _hand_made_torch_file(tmp_path / "ok.pt", _rebuild_tensor_pickle(ok))
    np.testing.assert_array_equal(
        torch_reader.load(tmp_path / "ok.pt").read(), np.arange(8).reshape(2, 4)
    )
    build = b"}X\x06\x00\x00\x00strideK\x14J\xff\xff\xff\xff\x86sb"  # {"stride": (20, -1)}
    _hand_made_torch_file(tmp_path / "build.pt", _rebuild_tensor_pickle(ok, build))
    with pytest.raises(torch_reader.TorchFileError, match="modify a TensorRef"):
        torch_reader.load(tmp_path / "build.pt")
    bad = b"K\x02K\x04\x86K\x04J\xff\xff\xff\xff\x86"  # stride (4, -1)
    _hand_made_torch_file(tmp_path / "bad.pt", _rebuild_tensor_pickle(bad))
    with pytest.raises(torch_reader.TorchFileError, match="negative size or stride"):
        torch_reader.load(tmp_path / "bad.pt")
    _hand_made_torch_file(tmp_path / "junk.pt", b"\x80\x02(garbage")
    with pytest.raises(torch_reader.TorchFileError, match="junk.pt: unreadable pickle"):
        torch_reader.load(tmp_path / "junk.pt")
