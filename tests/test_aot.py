"""Compiling for TPU slices on this CPU with libtpu's compiler (opt_jax/training/aot.py,
scripts/aot_compile.py): tiny shapes, a 4-chip v5e and an 8-chip v5p."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import opt_jax
from opt_jax.parallel import sharding
from opt_jax.planning import memory
from opt_jax.serving.aot import serving_programs
from opt_jax.training import aot
from opt_jax.training.experiment import base_config

ROOT = Path(__file__).resolve().parents[1]
# Widths of whole TPU tiles (128 lanes), so the compiler pads little.
MODEL = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, ffn_dim=512,
             num_attention_heads=2, max_position_embeddings=510)  # fmt: skip


def _experiment(**model):
    experiment = base_config()
    experiment.model.preset = ""
    for name, value in {**MODEL, "word_embed_proj_dim": 256, **model}.items():
        experiment.model[name] = value
    return experiment


def _config(**fields):
    return opt_jax.OPTConfig(**{**MODEL, **fields})


def _shard_bytes(tree) -> int:
    return sharding.per_device_bytes(tree, jax.tree.map(lambda x: x.sharding, tree))


def test_train_step_compiles_for_a_v5e_slice_with_the_state_as_arguments(tmp_path):
    mesh = aot.make_mesh("v5e:2x2", (1, 4, 1))
    rules = sharding.rules_from_config(_experiment().sharding_rules)
    (step,), state = aot.train_programs(_experiment(), _config(), mesh, rules, 8, 256)
    b = step.bytes_per_chip
    state_bytes = _shard_bytes(state)
    batch_bytes = 2 * 8 * 256 * 4 // 4  # ids and mask, int32, split over 4 chips
    # The donated state comes back in place; the arguments are the state's shards plus the
    # batch, up to the TPU's tile padding of small leaves (biases, scalars): 0.45% here.
    assert state_bytes + batch_bytes <= b["arguments"] <= 1.01 * (state_bytes + batch_bytes)
    # The planner lays the state out as the TPU does (tiles of 8 x 128, a scalar in one 128-lane
    # row): its bytes are the compiler's arguments exactly.
    plan = memory.plan(_config(), {"fsdp": 4}, 8, 256)
    inputs = 2 * memory.tpu_array_bytes((2, 256), 4) + memory.tpu_array_bytes((2,), 4)
    scalars = sum(leaf.ndim == 0 for leaf in jax.tree.leaves(state))
    planned = plan["params"] + plan["optimizer"] + scalars * memory.tpu_array_bytes((), 4) + inputs
    assert planned == b["arguments"], (planned, b["arguments"])
    assert b["aliased"] >= 0.99 * state_bytes
    assert b["temporaries"] > 0
    # FSDP: parameters gathered for the forward and backward passes, gradients scattered.
    assert step.collectives["all-gather"]["count"] > 0
    assert step.collectives["reduce-scatter"]["count"] > 0
    # Saved for the slice (what aot_compile.py --save writes); this CPU process cannot run it.
    path = aot.save_executable(str(tmp_path), step.name, step.executable, {"mesh": [1, 4, 1]})
    manifest = json.loads((tmp_path / f"{step.name}.json").read_text())
    assert manifest["platform"] == "tpu" and manifest["devices"] == 4 and manifest["libtpu"]
    with pytest.raises(ValueError, match=r"compiled for TPU v5 lite \(tpu\) chips \(this process "
                       r"has cpu \(cpu\)\): recompile it here"):  # fmt: skip
        aot.load_executable(path)


@pytest.mark.parametrize(
    "fields",
    [
        {},  # bfloat16 weights as served
        {"quantization": "int8"},
        {"scan_layers": True},  # one stacked [L, B, N, S, H] cache, sharded like a layer's
    ],
)
def test_decode_programs_compile_for_a_v5p_slice(fields):
    config = _config(dtype="bfloat16", param_dtype="bfloat16", **fields)
    mesh = aot.make_mesh("v5p:2x2x2", (2, 2, 2))
    rules = sharding.rules_from_config(_experiment().sharding_rules)
    programs, params = aot.decode_programs(config, mesh, rules, 4, 256)
    assert [p.name for p in programs] == ["prefill", "decode_step"]
    decode = programs[1].bytes_per_chip
    # k and v of 2 layers: rows over data x fsdp, width over tensor, bfloat16.
    cache = 2 * 2 * (4 // 4) * 256 * (256 // 2) * 2
    assert decode["arguments"] >= _shard_bytes(params) + cache
    # Tensor parallelism: the attention and MLP outputs are summed across the tensor axis.
    assert programs[1].collectives["all-reduce"]["count"] > 0


def test_an_int8_decode_step_sums_across_chips_what_bfloat16_does():
    """Traced for a TPU, weight-only int8 converts its kernels in the product: the
    tensor-parallel all-reduce carries one bfloat16 partial sum per row, as with bfloat16
    weights (XLA:CPU's int8 limbs of the activations made it three int32 ones: 6x the bytes)."""
    mesh = aot.make_mesh("v5e:2x2", (1, 1, 4))
    rules = sharding.rules_from_config(_experiment().sharding_rules)
    reduced = []
    for method in ("none", "int8"):
        config = _config(dtype="bfloat16", param_dtype="bfloat16", quantization=method,
                         num_attention_heads=4)  # fmt: skip
        (_, step), _ = aot.decode_programs(config, mesh, rules, 1, 256)
        reduced.append(step.collectives["all-reduce"]["bytes"])
    assert reduced[1] == reduced[0] > 0, reduced


def test_a_scanned_decode_step_updates_its_cache_in_place():
    """scan_layers decoding: the layers' new keys and values are written into the donated
    [L, B, N, S, H] cache after the scan, row by row. Before, the TPU compiler kept a second
    copy of the cache (0.53x of it in temporaries here: the scan's stacked output, relaid out
    around a scatter); now 0.02x."""
    config = _config(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                     hidden_size=1024, num_attention_heads=8, word_embed_proj_dim=1024,
                     max_position_embeddings=2048)  # fmt: skip
    mesh = aot.make_mesh("v5e:2x2", (1, 1, 4))
    rules = sharding.rules_from_config(_experiment().sharding_rules)
    programs, _ = aot.decode_programs(config, mesh, rules, 16, 2048)
    cache = 2 * 2 * 16 * 2048 * (1024 // 4) * 2  # k and v, 2 layers, heads over 4 chips
    step = programs[1].bytes_per_chip
    assert step["aliased"] >= cache
    assert step["temporaries"] < 0.1 * cache, step["temporaries"] / cache


def test_decode_programs_with_the_layers_in_host_memory():
    """OPTConfig(layer_memory="pinned_host") compiles for a TPU slice: the layers' kernels are
    arguments in host memory, not in HBM, and the scan moves each layer's kernels to the chip
    asynchronously (dynamic-slice-start from host memory space S(5))."""
    mesh = aot.make_mesh("v5e:2x2", (2, 1, 2))
    rules = sharding.rules_from_config(_experiment().sharding_rules)
    fields = dict(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)
    (_, on_chip), _ = aot.decode_programs(_config(**fields), mesh, rules, 4, 256)
    host = _config(**fields, layer_memory="pinned_host")
    (_, step), _ = aot.decode_programs(host, mesh, rules, 4, 256)
    kernels = 2 * (4 * 256 * 256 + 2 * 256 * 512) * 2 // 2  # 2 layers, bfloat16, tensor 2
    assert step.bytes_per_chip["host_arguments"] == kernels
    assert on_chip.bytes_per_chip["host_arguments"] == 0
    moved = on_chip.bytes_per_chip["arguments"] - step.bytes_per_chip["arguments"]
    assert moved == kernels
    hlo = step.executable.as_text()
    # Each layer slice of each of the 6 kernels is read from host memory on its own.
    starts = [
        line
        for line in hlo.splitlines()
        if " dynamic-slice-start(" in line and "S(5)" in line.split(" dynamic-slice-start(")[0]
    ]
    assert len(starts) >= 6, len(starts)
    # int8 codes are host arguments as 4-byte words (the layout the compiler streams), of the
    # same bytes.
    (_, q_step), _ = aot.decode_programs(host.replace(quantization="int8"), mesh, rules, 4, 256)
    words = [line for line in q_step.executable.as_text().splitlines()
             if "parameter(" in line and "s32[2," in line and "S(5)" in line]  # fmt: skip
    assert len(words) == 6, len(words)


def test_serving_engine_programs_compile_for_a_v5p_slice():
    """The serving engine's prefill, slot insert and decode step (opt_jax/serving/engine.py)
    at full load: the step carries the cache and each slot's logits and counts, donated."""
    config = _config(dtype="bfloat16", param_dtype="bfloat16")
    mesh = aot.make_mesh("v5p:2x2x2", (2, 2, 2))
    rules = sharding.rules_from_config(_experiment().sharding_rules)
    programs, params = serving_programs(config, mesh, rules, 4, 256)
    assert [p.name for p in programs] == ["engine_prefill", "engine_insert", "engine_step"]
    step = programs[2].bytes_per_chip
    cache = 2 * 2 * (4 // 4) * 256 * (256 // 2) * 2  # as in the decode test above
    slots = 2 * (4 // 4) * 512 * 4  # logits float32 and counts int32, [B, V] rows over 4 chips
    assert step["arguments"] >= _shard_bytes(params) + cache + slots
    # The slot state is donated: the cache and the [B, V] arrays are updated in place.
    assert step["aliased"] >= cache + slots
    assert programs[1].bytes_per_chip["aliased"] >= cache  # insert: in place too
    assert programs[2].collectives["all-reduce"]["count"] > 0  # tensor-parallel sums


def test_lora_and_flash_train_steps_compile():
    mesh = aot.make_mesh("v5e:2x2", (1, 4, 1))
    experiment = _experiment()
    experiment.lora.rank = 4
    rules = sharding.rules_from_config(experiment.sharding_rules)
    config = _config(lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "v_proj"))
    (lora_step,), state = aot.train_programs(experiment, config, mesh, rules, 8, 256)
    # Only the adapters train: the optimizer state holds no moments of the frozen weights.
    full = math.prod(MODEL[k] for k in ("hidden_size", "ffn_dim")) * 4 * 3  # fc1, three copies
    assert lora_step.bytes_per_chip["arguments"] < _shard_bytes(state) + full
    flash = _config(attention_impl="flash", dtype="bfloat16")
    (step,), _ = aot.train_programs(_experiment(), flash, mesh, rules, 8, 256)
    assert step.bytes_per_chip["temporaries"] > 0


def test_collectives_count_each_loop_iteration():
    hlo = "\n".join(
        [
            "%body (p: f32[4]) -> f32[4] {",
            "  %all-reduce.1 = f32[4]{0} all-reduce(%p), to_apply=%add",
            "}",
            "ENTRY %main (a: f32[4]) -> f32[4] {",
            '  %w = f32[4]{0} while(%a), condition=%cond, body=%body, backend_config={"known_'
            'trip_count":{"n":"24"}}',
            "  %all-gather.2 = f32[8,4]{1,0} all-gather(%w), dimensions={0}",
            "}",
        ]
    )
    found = aot.collectives(hlo)
    assert found["all-reduce"] == {"count": 24, "bytes": 24 * 16}
    assert found["all-gather"] == {"count": 1, "bytes": 128}
    # The TPU compiler annotates no trip count: the condition's counter limit gives it.
    tpu = (
        hlo.replace(', backend_config={"known_trip_count":{"n":"24"}}', "")
        + "\n"
        + "\n".join(
            [
                "%cond (p: s32[]) -> pred[] {",
                "  %constant.7 = s32[]{:T(128)} constant(12)",
                "  ROOT %lt = pred[] compare(%p, %constant.7), direction=LT",
                "}",
            ]
        )
    )
    assert aot.collectives(tpu)["all-reduce"]["count"] == 12


def _script(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/aot_compile.py"),
         "--config", str(ROOT / "configs/tiny.py"), *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_script_contract_and_a_program_that_does_not_fit(tmp_path):
    out = tmp_path / "decode.json"
    # A v5e chip (16 GiB) cannot hold 2048 rows of a 2048-slot KV cache of this model (34 GB).
    done = _script("--topology", "v5e:2x2", "--mesh", "4,1,1", "--workload", "decode",
                   "--batch", "8192", "--seq_len", "2048", "--json", str(out),
                   "--config.model.max_position_embeddings=2048",
                   "--save", str(tmp_path / "exe"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    r = json.loads(out.read_text())
    assert r["fits"] is False and r["chips"] == 4
    assert r["bytes_per_chip"]["total"] > 0.95 * r["hbm_bytes_per_chip"]
    for key in ("arguments", "outputs", "temporaries", "aliased", "total"):
        assert key in r["bytes_per_chip"] and key in r["plan"]
    assert r["model_flops_per_step"] > 0 and r["compile_seconds"] > 0
    assert set(r["collectives"]) == set(aot.COLLECTIVES)
    assert "DOES NOT FIT" in done.stdout
    # The TPU compiler refuses a program that cannot fit: its message gives the temporaries.
    assert "exceeds available HBM" in r["compiler_refused"]["decode_step"]
    assert r["saved"] == []  # --save: nothing compiled, nothing to save


def test_a_refused_program_reports_its_whole_need_once():
    """The compiler's refusal names the program's whole need, arguments included: a 17 GiB
    argument and almost no temporaries is 17 GiB in all, not 34."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = aot.make_mesh("v5e:2x2", (1, 4, 1))
    replicated = NamedSharding(mesh, P())
    x = jax.ShapeDtypeStruct((17 * 2**18, 1024), jax.numpy.float32, sharding=replicated)
    fn = jax.jit(lambda x: (x * 2).sum(0), out_shardings=replicated)
    refused = aot.compile_program("f", fn, x)
    assert refused.executable is None and "exceeds available HBM" in refused.error
    b = refused.bytes_per_chip
    assert b["arguments"] == 17 * 2**30
    assert b["total"] == 17 * 2**30 and b["temporaries"] == 0, b


def test_a_saved_executable_loads_and_runs(tmp_path):
    """save_executable / load_executable round trip (on this CPU: a TPU executable needs the
    slice), and a version mismatch is refused with the versions named."""
    f = jax.jit(lambda a, b: (a * 2 + b).sum(-1))
    x, y = np.ones((4, 8), np.float32), np.arange(32, dtype=np.float32).reshape(4, 8)
    path = aot.save_executable(str(tmp_path), "f", f.lower(x, y).compile(), {"note": "test"})
    np.testing.assert_array_equal(aot.load_executable(path)(x, y), f(x, y))
    manifest = json.loads((tmp_path / "f.json").read_text())
    assert manifest["about"] == {"note": "test"} and not list(tmp_path.glob("*.tmp"))
    (tmp_path / "f.json").write_text(json.dumps(dict(manifest, jax="0.0.1")))
    with pytest.raises(ValueError, match=r"compiled for jax 0\.0\.1 \(this process: "):
        aot.load_executable(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--topology", "v5e:2x2", "--mesh", "1,8,1"], "has 8 devices, topology v5e:2x2 has 4"),
        (["--topology", "v9x:2x2", "--mesh", "1,4,1"], "unknown TPU topology 'v9x:2x2'"),
        (
            ["--topology", "v5e:2x2", "--mesh", "1,1,4", "--config.model.num_attention_heads=2"],
            "tensor axis (4) must divide the heads (2)",
        ),  # fmt: skip
        (["--topology", "v5e:2x2", "--mesh", "1,4"], "--mesh must be three positive sizes"),
    ],
)
def test_bad_requests_are_one_line_errors(args, message):
    done = _script(*args)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_unknown_topology_in_process():
    with pytest.raises(ValueError, match="unknown TPU topology"):
        aot.topology_devices("v5e-8")
    assert np.isclose(aot.chip_hbm_bytes("v5p:2x2x1") / 1024**3, 95)


def test_the_compilers_heap_read_off_its_dump(tmp_path):
    """experiments/memory: tpu_grid.py compiles a training step for a v5e slice and --heap
    compiles it again with an XLA dump, from which heap.py rebuilds libtpu's heap. What the
    compiler reports as temporaries is 2 x the heap's allocation - the heap's peak without the
    loops' state (the relation memory._scanned_step is built on), and the live peak lies
    between that peak and the allocation."""
    out = tmp_path / "grid.jsonl"
    common = [sys.executable, str(ROOT / "experiments/memory/tpu_grid.py"), "--out", str(out)]
    point = ["--sizes", "125m", "--meshes", "1x4x1", "--scan", "true", "--remat", "full",
             "--layers", "2", "--seq_len", "512"]  # fmt: skip
    subprocess.run(common + point, check=True, capture_output=True, timeout=600)
    subprocess.run(common + ["--heap"], check=True, capture_output=True, timeout=600)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    heap, reported = row["heap"], row["compiler"]["temporaries"]
    transient = heap["live_peak_without_loop_state"]
    assert transient <= heap["live_peak"] <= heap["allocation"] < reported
    assert abs(reported - (2 * heap["allocation"] - transient)) <= 0.02 * reported, (row, heap)
    assert heap["peak_values"] and all(size > 0 for _, size in heap["peak_values"])
