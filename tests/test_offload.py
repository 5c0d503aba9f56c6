"""Layer-streamed generation from disk (load_pretrained(offload="disk")): the same tokens as
generate on the same weights in memory, memory held under the limit, and clear errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import opt_jax
from opt_jax.checkpoints.offload import DiskLayers, parse_bytes
from opt_jax.config import OPTConfig

CONFIG = OPTConfig(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=4,
    ffn_dim=128,
    num_attention_heads=4,
    max_position_embeddings=256,
)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An HF directory of a random model stored in float16, and the model in memory."""
    path = tmp_path_factory.mktemp("offload") / "model"
    params = opt_jax.init_params(CONFIG, 0)
    half = jax.tree.map(lambda x: x.astype(np.float16), params)
    opt_jax.save_pretrained(path, CONFIG.replace(param_dtype="float16"), half)
    # Computing in float32 from float16 weights, as a CPU user would run a published checkpoint.
    config, params = opt_jax.load_pretrained(path, dtype="float32", param_dtype="float32")
    return str(path), config, params


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, CONFIG.vocab_size, (5, 40))
    mask = np.ones_like(ids)
    mask[0, :9], mask[3, :30] = 0, 0  # ragged, left-padded
    return ids, mask


def _offloaded(path, limit="64MB"):
    return opt_jax.load_pretrained(
        path, offload="disk", memory_limit=limit, dtype="float32", param_dtype="float32"
    )


def _limit_where(path, batch, buffer_length, prompt_length, wanted, what):
    """The smallest memory limit (in 4 KB steps) whose plan for the request is `wanted`."""
    _, source = _offloaded(path)
    for limit in range(source.memory_limit // 64, source.memory_limit, 4096):
        source.memory_limit = limit
        try:
            plan = source.plan(batch, buffer_length, prompt_length)
        except ValueError:
            continue
        if wanted(plan):
            return limit, plan
    raise AssertionError(f"no limit {what}")


def _limit_that_streams(path, batch, buffer_length, prompt_length):
    """A memory limit under which some layers stay resident, others stream, and the prefill
    runs in micro-batches: every path of the schedule at once."""
    return _limit_where(
        path, batch, buffer_length, prompt_length,
        lambda p: 0 < len(p.resident_layers) < CONFIG.num_hidden_layers and p.prefill_rows < batch,
        "streams some layers and micro-batches the prefill",
    )  # fmt: skip


def _limit_with_cache_on_disk(path, batch, buffer_length, prompt_length):
    """A limit under which the KV cache of some layers goes to disk, others' stays in memory,
    some layers stay resident and the micro-batches are uneven (5 rows in 2 + 2 + 1)."""
    return _limit_where(
        path, batch, buffer_length, prompt_length,
        lambda p: 0 < len(p.cache_on_disk) < CONFIG.num_hidden_layers and bool(p.resident_layers)
        and p.decode_rows == 2,
        "puts part of the cache on disk",
    )  # fmt: skip


def test_streamed_equals_in_memory_greedy_and_sampled(checkpoint, prompts):
    path, config, params = checkpoint
    ids, mask = prompts
    model = opt_jax.OPTForCausalLM(config)
    # generate buckets the 40-token prompt to 64 and 20 new tokens to a 96-slot buffer.
    for options in (
        {},
        {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 50},
        {"repetition_penalty": 1.3, "output_logprobs": True, "no_repeat_ngram_size": 2},
        {"do_sample": True, "num_return_sequences": 2, "eos_token_id": 7},
    ):
        rows = 5 * options.get("num_return_sequences", 1)
        limit, plan = _limit_that_streams(path, rows, 96, 64)
        offloaded_config, source = _offloaded(path, limit)
        assert offloaded_config == config and isinstance(source, DiskLayers)
        want = opt_jax.generate(model, params, ids, mask, max_new_tokens=20, seed=3, **options)
        got = opt_jax.generate(model, source, ids, mask, max_new_tokens=20, seed=3, **options)
        np.testing.assert_array_equal(got.sequences, want.sequences, err_msg=str(options))
        if want.logprobs is not None:
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
        assert set(plan.resident_layers) == set(source._resident_layers)


def test_kv_cache_on_disk_equals_in_memory(checkpoint, prompts, tmp_path):
    """A cache larger than the limit goes to disk layer by layer, in a temporary file of
    offload_folder that is gone afterwards; tokens as in memory, greedy and sampled."""
    path, config, params = checkpoint
    ids, mask = prompts
    model = opt_jax.OPTForCausalLM(config)
    limit, plan = _limit_with_cache_on_disk(path, 5, 96, 64)
    assert plan.prefill_rows == plan.decode_rows
    _, source = opt_jax.load_pretrained(
        path, offload="disk", memory_limit=limit, offload_folder=tmp_path, dtype="float32",
        param_dtype="float32",
    )  # fmt: skip
    files = []

    def open_files(step, tokens):  # the cache's file (unlinked, open) is in tmp_path
        for fd in os.listdir("/proc/self/fd"):
            try:
                files.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass

    for options in ({}, {"do_sample": True, "temperature": 0.8, "top_p": 0.9}):
        want = opt_jax.generate(model, params, ids, mask, max_new_tokens=20, seed=3, **options)
        got = opt_jax.generate(
            model, source, ids, mask, max_new_tokens=20, seed=3, streamer=open_files, **options
        )
        np.testing.assert_array_equal(got.sequences, want.sequences, err_msg=str(options))
    assert any(f.startswith(f"{tmp_path}/") for f in files), files  # O_TMPFILE: "#inode"
    assert os.listdir(tmp_path) == []
    # Every pass reads each on-disk layer's whole cache, and writes back the slots it filled.
    layer_cache = 5 * 2 * 96 * CONFIG.hidden_size * 4
    disk = len(plan.cache_on_disk)
    passes = 2 * 20
    read = source.stats["cache_bytes_read"] - passes * disk * layer_cache
    assert 0 <= read <= 2 * layer_cache  # each call may read the next pass's first region
    # Two calls, keys and values: the prompt's 64 slots, then one per decode step (19).
    written = 2 * 2 * disk * (64 + 19) * 5 * CONFIG.hidden_size * 4
    assert source.stats["cache_bytes_written"] == written


def test_kv_cache_write_failure_is_an_error(checkpoint, prompts, monkeypatch):
    """A failed write-back (here: a full disk) stops generation with that error."""
    import errno

    from opt_jax.generation import disk_cache

    path, config, _ = checkpoint
    ids, mask = prompts
    limit, _ = _limit_with_cache_on_disk(path, 5, 96, 64)
    _, source = _offloaded(path, limit)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_cache.os, "pwrite", full)
    with pytest.raises(OSError, match="No space left"):
        opt_jax.generate(opt_jax.OPTForCausalLM(config), source, ids, mask, max_new_tokens=6)


@pytest.mark.parametrize("cache", ["in memory", "on disk"])
def test_memory_held_stays_under_the_limit(checkpoint, prompts, cache):
    path, config, params = checkpoint
    ids, mask = prompts
    if cache == "in memory":
        limit, plan = _limit_that_streams(path, 5, 96, 64)
    else:
        limit, plan = _limit_with_cache_on_disk(path, 5, 96, 64)
    _, source = _offloaded(path, limit)
    streamed = CONFIG.num_hidden_layers - len(plan.resident_layers)
    before = {id(a) for a in jax.live_arrays()}
    peak = [0]
    fetch = source.fetch

    def watched(i):  # runs in the fetch thread while a layer computes
        weights = fetch(i)
        # Distinct buffers: a streamed layer's arrays alias its read buffer, and arrays of a
        # finished layer may still be alive (not yet collected) over the same buffer.
        fresh = {}
        for a in jax.live_arrays():
            if id(a) in before:
                continue
            try:  # the compute thread may delete (donate) an array while we look
                fresh[a.unsafe_buffer_pointer()] = a.nbytes
            except jax.errors.JaxRuntimeError:
                pass
        held = sum(fresh.values())
        peak[0] = max(peak[0], held)
        return weights

    source.fetch = watched
    model = opt_jax.OPTForCausalLM(config)
    opt_jax.generate(model, source, ids, mask, max_new_tokens=20)
    assert 0 < peak[0] <= limit, (peak[0], limit)
    # Each forward pass reads every streamed layer once (one pass ahead may be in flight).
    passes = 20  # the prefill + 19 decode steps
    per_layer = source.layer_bytes
    # Layer fetches (resident layers are loaded once, apart): one per streamed layer and pass,
    # plus the next pass's first layer when its fetch had started before generation ended.
    assert passes * streamed <= source.stats["reads"] <= passes * streamed + 1
    assert source.stats["bytes_read"] >= passes * streamed * per_layer


def test_streamer_sees_every_token(checkpoint):
    path, config, params = checkpoint
    _, source = _offloaded(path)
    ids = np.array([[5, 9, 30, 41]])
    pieces = []
    want = opt_jax.generate(opt_jax.OPTForCausalLM(config), params, ids, max_new_tokens=8)
    opt_jax.generate(
        opt_jax.OPTForCausalLM(config), source, ids, max_new_tokens=8,
        streamer=lambda step, tokens: pieces.append(int(tokens[0])),
    )  # fmt: skip
    assert pieces == want.sequences[0, 4:].tolist()


def test_script_generates_offloaded(tmp_path):
    out = tmp_path / "random"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/random_checkpoint.py"), "--out", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    common = [sys.executable, str(ROOT / "scripts/generate.py"), "--model", str(out),
              "--prompt", "def f(x):", "--max_new_tokens", "6"]  # fmt: skip
    plain = subprocess.run(common, capture_output=True, text=True, check=True)
    streamed = subprocess.run(
        common + ["--offload", "disk", "--memory_limit", "20MB", "--offload_folder", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout
    hosted = subprocess.run(common + ["--offload", "host"], capture_output=True, text=True)
    assert hosted.returncode == 0, hosted.stderr
    assert hosted.stdout == plain.stdout
    small = subprocess.run(
        common + ["--offload", "disk", "--memory_limit", "2MB"], capture_output=True, text=True
    )
    assert small.returncode == 2
    assert (
        "error: memory_limit 2.0 MB is too small" in small.stderr
        and "need at least" in small.stderr
    )


def test_load_pretrained_into_host_memory(checkpoint, prompts):
    """load_pretrained(offload="host"): the layers' kernels are read into host memory, stacked
    (never placed on the device), with the config that streams them to the chip per layer; the
    tokens equal in-memory decoding, float and int8, and with given (unrolled) shardings."""
    from opt_jax.model import param_logical_axes
    from opt_jax.parallel import sharding

    path, config, params = checkpoint
    ids, mask = prompts[0][:2], prompts[1][:2]
    want = opt_jax.generate(opt_jax.OPTForCausalLM(config), params, ids, mask, max_new_tokens=8)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
    shardings = sharding.logical_to_shardings(param_logical_axes(config), mesh)
    for given in (None, shardings):
        hconfig, hosted = opt_jax.load_pretrained(
            path, offload="host", dtype="float32", param_dtype="float32", shardings=given
        )
        assert hconfig.scan_layers and hconfig.layer_memory == "pinned_host"
        leaves = jax.tree_util.tree_leaves_with_path(hosted)
        kinds = {jax.tree_util.keystr(p): x.sharding.memory_kind for p, x in leaves}
        kernels = [k for k in kinds if "'layers'" in k and k.endswith("['kernel']")]
        assert len(kernels) == 6 and {kinds[k] for k in kernels} == {"pinned_host"}
        assert {v for k, v in kinds.items() if k not in kernels} == {"device"}
        if given is not None:
            fc1 = hosted["model"]["decoder"]["layers"]["fc1"]["kernel"]
            assert fc1.sharding.spec[0] is None and fc1.shape[0] == CONFIG.num_hidden_layers
        got = opt_jax.generate(opt_jax.OPTForCausalLM(hconfig), hosted, ids, mask, max_new_tokens=8)
        np.testing.assert_array_equal(got.sequences, want.sequences)
    # int8: the codes stacked on the host as 4-byte words, the scales on the device.
    qconfig, qparams = opt_jax.load_pretrained(
        path, quantize="int8", scan_layers=True, dtype="float32", param_dtype="float32"
    )
    hconfig, hosted = opt_jax.load_pretrained(
        path, offload="host", quantize="int8", dtype="float32", param_dtype="float32"
    )
    assert hosted["model"]["decoder"]["layers"]["fc1"]["kernel"].dtype == np.int32
    want = opt_jax.generate(opt_jax.OPTForCausalLM(qconfig), qparams, ids, mask, max_new_tokens=8)
    got = opt_jax.generate(opt_jax.OPTForCausalLM(hconfig), hosted, ids, mask, max_new_tokens=8)
    np.testing.assert_array_equal(got.sequences, want.sequences)
    with pytest.raises(ValueError, match="offload='host' does not combine with memory_limit"):
        opt_jax.load_pretrained(path, offload="host", memory_limit="1GB")
    with pytest.raises(ValueError, match="offload='host' keeps the layers stacked"):
        opt_jax.load_pretrained(path, offload="host", scan_layers=False)
    with pytest.raises(ValueError, match="offload must be 'disk' .* or 'host', got 'gpu'"):
        opt_jax.load_pretrained(path, offload="gpu")


def test_benchmark_in_a_memory_cgroup(checkpoint, tmp_path):
    """benchmark_offload.py --cgroup_memory: the run happens inside a cgroup capped at the size
    (its peak usage reported, at most the cap), or, where cgroups are not writable, a one-line
    error saying so."""
    path, _, _ = checkpoint
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts/benchmark_offload.py"), "--model", path,
         "--memory_limit", "64MB", "--batches", "2", "--new_tokens", "3", "--accelerate=false",
         "--cgroup_memory", "1.5GB", "--output", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    if run.returncode:
        assert "--cgroup_memory needs a writable memory cgroup" in run.stderr, run.stderr
        return
    (row,) = json.loads(out.read_text())["rows"]
    ours = row["ours"]
    assert "error" not in ours, ours
    assert 0 < ours["cgroup_peak_bytes"] <= 1.5e9
    assert ours["seconds"] > 0 and ours["tokens_per_second"] > 0


@pytest.mark.parametrize(
    "text, expected",
    [("1GB", 10**9), ("512MB", 512 * 10**6), ("1.5GiB", int(1.5 * 2**30)), (4096, 4096)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "1 parsec", "-3GB", 0, "GB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="memory_limit"):
        parse_bytes(text)


def test_bad_requests(checkpoint, prompts):
    path, config, params = checkpoint
    ids, mask = prompts
    model = opt_jax.OPTForCausalLM(config)
    with pytest.raises(ValueError, match=r"memory_limit 0.1 MB is too small .* need at least"):
        _offloaded(path, "100KB")
    with pytest.raises(ValueError, match="needs memory_limit"):
        opt_jax.load_pretrained(path, offload="disk")
    with pytest.raises(ValueError, match="offload must be 'disk'"):
        opt_jax.load_pretrained(path, offload="ram", memory_limit="1GB")
    with pytest.raises(ValueError, match="does not combine with quantize"):
        opt_jax.load_pretrained(path, offload="disk", memory_limit="1GB", quantize="int8")
    # Enough for the weights, not for this request even with its KV cache on disk: said before
    # anything runs.
    _, source = _offloaded(path, "800KB")
    with pytest.raises(ValueError, match=r"KV cache .*5 rows x 96 slots, on disk\) need at least"):
        opt_jax.generate(model, source, ids, mask, max_new_tokens=20)
    with pytest.raises(ValueError, match="offload_folder .* is not a directory"):
        opt_jax.load_pretrained(
            path, offload="disk", memory_limit="1GB", offload_folder=f"{path}/config.json"
        )
    with pytest.raises(ValueError, match="offload_folder= is for offload='disk'"):
        opt_jax.load_pretrained(path, offload_folder="/tmp")
    _, source = _offloaded(path)
    with pytest.raises(ValueError, match="not beam search"):
        opt_jax.generate(model, source, ids, mask, max_new_tokens=4, num_beams=2)
    with pytest.raises(ValueError, match="speculative decoding does not take offloaded"):
        opt_jax.generate(model, source, ids, mask, max_new_tokens=4, prompt_lookup_num_tokens=3)
    other = opt_jax.OPTForCausalLM(config.replace(dtype="bfloat16"))
    with pytest.raises(ValueError, match="config differs"):
        opt_jax.generate(other, source, ids, mask, max_new_tokens=4)


def test_bad_checkpoints(checkpoint, tmp_path):
    path, config, params = checkpoint
    weights = os.path.join(path, "model.safetensors")

    def copy(name):
        target = tmp_path / name
        shutil.copytree(path, target)
        return target

    truncated = copy("truncated")
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    with pytest.raises(ValueError, match="truncated inside tensor"):
        _offloaded(str(truncated))

    reshaped = copy("reshaped")
    (reshaped / "config.json").write_text(
        json.dumps(dict(json.loads((reshaped / "config.json").read_text()), ffn_dim=96))
    )
    with pytest.raises(
        ValueError, match=r"layers.0.fc1.bias has shape \(128,\), the config expects \(96,\)"
    ):
        _offloaded(str(reshaped))

    deeper = copy("deeper")
    (deeper / "config.json").write_text(
        json.dumps(dict(json.loads((deeper / "config.json").read_text()), num_hidden_layers=5))
    )
    with pytest.raises(ValueError, match=r"missing tensors: model.decoder.layers.4"):
        _offloaded(str(deeper))

    torch_files = copy("torch")
    (torch_files / "model.safetensors").rename(torch_files / "pytorch_model.bin")
    with pytest.raises(ValueError, match="reads safetensors files"):
        _offloaded(str(torch_files))


def test_layers_in_host_memory_decode_as_in_device_memory(checkpoint, prompts):
    """OPTConfig(layer_memory="pinned_host"): the stacked layers' kernels live in host memory
    (param_tree.place_layers) and move to the device one layer at a time inside the program.
    The tokens equal those of the same weights in device memory (greedy and seeded sampling).
    (On a TPU slice the same program compiles with the kernels in host memory:
    tests/test_aot.py.)"""
    from opt_jax.param_tree import place_layers, stack_layers

    _, config, params = checkpoint
    ids, mask = prompts
    scanned = config.replace(scan_layers=True)
    stacked = stack_layers(params, config.num_hidden_layers)
    hosted = place_layers(stacked)
    kinds = {
        jax.tree_util.keystr(p): x.sharding.memory_kind
        for p, x in jax.tree_util.tree_leaves_with_path(hosted)
    }
    layer_kernels = [k for k in kinds if "'layers'" in k and k.endswith("['kernel']")]
    assert len(layer_kernels) == 6  # q, k, v, out, fc1, fc2
    assert all(kinds[k] == "pinned_host" for k in layer_kernels)
    assert {v for k, v in kinds.items() if k not in layer_kernels} == {"device"}
    model = opt_jax.OPTForCausalLM(scanned)
    host_model = opt_jax.OPTForCausalLM(scanned.replace(layer_memory="pinned_host"))
    for options in ({}, {"do_sample": True, "temperature": 0.8, "top_k": 50}):
        want = opt_jax.generate(model, stacked, ids, mask, max_new_tokens=12, seed=1, **options)
        got = opt_jax.generate(host_model, hosted, ids, mask, max_new_tokens=12, seed=1, **options)
        np.testing.assert_array_equal(got.sequences, want.sequences, err_msg=str(options))
    # Quantised kernels: one-byte codes are kept in host memory as 4-byte words (the layout
    # libtpu streams a layer at a time) and unpacked on the device, bit for bit.
    for method in ("int8", "int4"):
        qconfig, qparams = opt_jax.quantize(scanned, stacked, method, group_size=32)
        qhosted = place_layers(qparams)
        words = [x.dtype for x in jax.tree.leaves(qhosted["model"]["decoder"]["layers"])]
        assert {jax.numpy.dtype("int32" if method == "int8" else "uint32")} <= set(words)
        ids_ = ids[:2]
        want = opt_jax.generate(opt_jax.OPTForCausalLM(qconfig), qparams, ids_, mask[:2],
                                max_new_tokens=8)  # fmt: skip
        got = opt_jax.generate(
            opt_jax.OPTForCausalLM(qconfig.replace(layer_memory="pinned_host")), qhosted, ids_,
            mask[:2], max_new_tokens=8,
        )  # fmt: skip
        np.testing.assert_array_equal(got.sequences, want.sequences, err_msg=method)
    with pytest.raises(ValueError, match="layer_memory 'pinned_host' needs scan_layers=True"):
        config.replace(layer_memory="pinned_host")
    with pytest.raises(ValueError, match="layer_memory 'hbm' is not one of"):
        scanned.replace(layer_memory="hbm")
    with pytest.raises(ValueError, match="place_layers needs the scan layout"):
        place_layers(params)
