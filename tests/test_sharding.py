"""Sharding on 8 emulated CPU devices, restore onto another mesh, two real processes, and the
per-device memory of every preset on large (abstract) meshes."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import assert_trees_equal
from jax.sharding import AbstractMesh

import opt_jax
from opt_jax.checkpoints import orbax_io as checkpoint
from opt_jax.parallel import sharding
from opt_jax.training.metrics import read_metrics

HERE = Path(__file__).resolve().parent


def _python(*args, timeout=480):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(HERE))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def eight_device_results():
    return {r["mesh"]: r for r in _python(str(HERE / "sharding_checks.py"))}


EXPECTED_SHARDS = {  # q_proj kernel [D=32, N=8, H=4] and fc1 kernel [32, F=64] per device
    "data=8": ([32, 8, 4], [32, 64]),
    "fsdp=8": ([4, 8, 4], [4, 64]),
    "tensor=8": ([32, 1, 4], [32, 8]),
    "2x2x2": ([16, 4, 4], [16, 32]),
}


# A dropout mask [B=8, T=12, F=32] sharded as activations are: batch over data and fsdp, the
# MLP dimension over tensor.
MASK_SHARDS = {"data=8": [1, 12, 32], "fsdp=8": [1, 12, 32], "tensor=8": [8, 12, 4],
               "2x2x2": [2, 12, 16]}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(EXPECTED_SHARDS))
def test_sharded_forward_train_step_and_generation_match_one_device(eight_device_results, mesh):
    r = eight_device_results[mesh]
    q, fc1 = EXPECTED_SHARDS[mesh]
    assert r["q_proj_shard"] == q and r["fc1_shard"] == fc1
    assert r["adam_mu_fc1_shard"] == fc1  # optimizer state sharded like its parameter
    assert r["logits_rel"] <= 1e-5
    assert r["dropout_masks_equal"] and r["dropout_masks_shard"] == MASK_SHARDS[mesh]
    assert r["loss_rel"] <= 1e-5 and r["grad_norm_rel"] <= 1e-5
    assert r["params_rel"] <= 1e-5
    assert r["k_bias_abs"] <= 2 * 6e-4  # see sharding_checks.py: Adam on a zero gradient
    assert r["tokens_equal"]
    # KV cache [B=8, N=8, S=16, H=4]: batch over data x fsdp, heads over tensor.
    batch_ways = {"data=8": 8, "fsdp=8": 8, "tensor=8": 1, "2x2x2": 4}[mesh]
    heads_ways = {"data=8": 1, "fsdp=8": 1, "tensor=8": 8, "2x2x2": 2}[mesh]
    assert r["kv_cache_shard"] == [8 // batch_ways, 8 // heads_ways, 16, 4]


@pytest.mark.slow
def test_lora_adapters_shard_like_their_kernels(eight_device_results):
    r = eight_device_results["lora 2x2x2"]
    # q_proj kernel [D=32, N=8, H=4]: A [D, r] splits D over fsdp; B [r, N, H] splits heads over
    # tensor. fc1 [32, F=64]: A [32, r] over fsdp, B [r, 64] over tensor.
    assert r["q_lora_A_shard"] == [16, 4] and r["q_lora_B_shard"] == [4, 4, 4]
    assert r["fc1_lora_A_shard"] == [16, 4] and r["fc1_lora_B_shard"] == [4, 32]
    assert r["logits_rel"] <= 1e-5 and r["tokens_equal"]


@pytest.mark.slow
def test_quantized_params_shard_like_their_kernels(eight_device_results):
    r = eight_device_results["quantized 2x2x2"]
    # out_proj [N=8 x H=4, D=32]: int4 packs it into [16, 32] rows, which split with the heads
    # over tensor and D over fsdp; int8 (LLM.int8()) stores it [D, N, H].
    assert r["int4"]["out_proj_shape"] == [16, 32] and r["int4"]["out_proj_shard"] == [8, 16]
    assert r["llm_int8"]["out_proj_shape"] == [32, 8, 4]
    assert r["llm_int8"]["out_proj_shard"] == [16, 4, 4]
    for method in ("int4", "llm_int8"):
        assert r[method]["logits_rel"] <= 1e-5 and r[method]["tokens_equal"], method


@pytest.mark.slow
def test_compression_calibrates_over_data_shards(eight_device_results):
    r = eight_device_results["compressed 2x2x2"]
    assert r["hessians"] == ["fc1", "fc2", "out_proj", "qkv"]
    assert r["hessian_rel"] <= 1e-5  # the sum over 4 data shards is the one-device sum
    assert r["gptq_codes_equal"] >= 0.99  # float summation order may move a rounding
    # out_proj's 3-bit codes [N x H x 3 / 8 = 12, D=32] split with the heads (tensor) and D.
    assert r["out_proj_shard"] == [6, 16]
    assert r["logits_rel"] <= 1e-5


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
    """Saved on fsdp=8, restored on tensor=4 x data=2: bitwise (np.array_equal) the checkpoint's
    state, parameters included, and the parameters the first run exported."""
    (r,) = _python(str(HERE / "sharding_checks.py"), "restore", str(tmp_path))
    assert r["state_leaves"] > r["param_leaves"] > 0  # params, Adam moments and counters
    assert r["state_mismatched"] == [] and r["params_vs_export_mismatched"] == []
    assert r["q_proj_shard"] == [32, 1, 8]  # heads split 4 ways, embed whole
    assert r["final_step"] == 4 and np.isfinite(r["final_loss"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path, workdir, overrides: str, flags: list[str], timeout=420):
    """Runs train_helpers.py as a two-process job on localhost: (exit codes, outputs)."""
    helper = str(HERE / "train_helpers.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(HERE))
    env.pop("XLA_FLAGS", None)
    port = str(_free_port())
    logs = [open(tmp_path / f"proc{i}.log", "w+") for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                helper,
                str(workdir),
                overrides,
                *flags,
                "--distributed",
                port,
                "2",
                str(i),
            ],
            env=env,
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return codes, outputs


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh",
    [{"mesh.data": 2, "mesh.fsdp": 4}, {"mesh.data": 1, "mesh.fsdp": 4, "mesh.dcn_data": 2}],
    ids=["data2_fsdp4", "fsdp4_x_dcn_data2"],
)
def test_two_processes_match_one_process_and_restore_bitwise(tmp_path, mesh):
    overrides = json.dumps({"batch_size": 8, "num_train_steps": 4, "checkpoint_every_steps": 2,
                            "eval_every_steps": 2, **mesh})  # fmt: skip
    helper = str(HERE / "train_helpers.py")
    _python(helper, str(tmp_path / "one"), overrides, "--devices", "8")
    codes, outputs = _two_processes(tmp_path, tmp_path / "two", overrides, ["--devices", "4"])
    if codes != [0, 0]:
        pytest.fail(
            f"processes ended with {codes}:\n" + "\n----\n".join(o[-3000:] for o in outputs)
        )
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # process 0 alone writes the log
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    # A single process restores the two-process checkpoint (and re-exports its params).
    shutil.copytree(tmp_path / "two" / "export", tmp_path / "export_two")
    _python(helper, str(tmp_path / "two"), overrides, "--devices", "8")
    _, exported = checkpoint.load_params(tmp_path / "export_two")
    _, restored = checkpoint.load_params(tmp_path / "two" / "export")
    assert_trees_equal(exported, restored)


def test_indivisible_dimension_names_parameter_dimension_and_axis():
    config = opt_jax.preset("125m", num_hidden_layers=1)
    abstract = opt_jax.abstract_params(config)
    specs = opt_jax.param_logical_axes(config)
    sharding.check_divisible(abstract, specs, {"data": 1, "fsdp": 8, "tensor": 4})
    with pytest.raises(
        ValueError,
        match=r"\['k_proj'\]\['bias'\]: dimension 0 \(heads, size 12\) is not divisible by mesh "
        r"axis tensor of size 8",
    ):
        sharding.check_divisible(abstract, specs, {"data": 1, "fsdp": 1, "tensor": 8})
    with pytest.raises(ValueError, match="needs 16 devices, there are"):
        sharding.make_mesh(2, 2, 4, devices=jax.devices() * 1)
    with pytest.raises(ValueError, match="at most one mesh size may be -1"):
        sharding.make_mesh(-1, -1, 1)


@pytest.mark.parametrize(
    "sizes, match",
    [
        (dict(dcn_data=0), r"mesh size dcn_data must be >= 1, got 0"),
        (dict(dcn_tensor=-1), r"mesh size dcn_tensor must be >= 1, got -1"),
        (
            dict(tensor=0),
            r"mesh size tensor must be >= 1 \(or -1 for the remaining devices\), got 0",
        ),
        (dict(data=-2), r"mesh size data must be >= 1 .*, got -2"),
        (dict(fsdp=1.5), r"mesh size fsdp must be an integer, got 1.5"),
    ],
)
def test_mesh_sizes_are_checked_before_any_arithmetic(sizes, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(**sizes)


@pytest.mark.parametrize("name", opt_jax.PRESETS)
def test_preset_per_device_parameter_bytes_on_large_meshes(name):
    """eval_shape of every preset, sharded on abstract meshes of up to 2048 devices."""
    config = opt_jax.preset(name, param_dtype="bfloat16")
    abstract = opt_jax.abstract_params(config)
    specs = opt_jax.param_logical_axes(config)
    total = sum(x.size * 2 for x in jax.tree.leaves(abstract))
    tensor = max(t for t in (8, 4, 2, 1) if config.num_attention_heads % t == 0)
    for fsdp, tp in ((8, 1), (64, tensor), (256, tensor)):
        shape = {"data": 1, "fsdp": fsdp, "tensor": tp}
        sharding.check_divisible(abstract, specs, shape)
        mesh = AbstractMesh(tuple(shape.values()), sharding.MESH_AXES)
        per_device = sharding.per_device_bytes(abstract, sharding.logical_to_shardings(specs, mesh))
        ideal = total / (fsdp * tp)
        # Only the small q/k/v biases ([heads, head_dim]) stay whole along fsdp.
        assert ideal <= per_device <= 1.01 * ideal + 2**20, (fsdp, tp, per_device, ideal)


@pytest.mark.slow
def test_sigterm_on_one_process_stops_every_process_at_the_same_step(tmp_path):
    """Preemption seen by one host: both processes save the same step and exit cleanly (a lone
    process saving would hang the collective save), and a restart resumes from that step."""
    overrides = json.dumps({"batch_size": 8, "num_train_steps": 8, "checkpoint_every_steps": 8,
                            "eval_every_steps": 0, "log_every_steps": 2,
                            "stop_check_every_steps": 2})  # fmt: skip
    flags = ["--devices", "2", "--sigterm-at", "2", "--sigterm-process", "1"]
    codes, outputs = _two_processes(tmp_path, tmp_path / "run", overrides, flags)
    assert codes == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    # Process 1 alone got SIGTERM while logging step 2; both agree there and save step 2.
    assert "[train] signal 15: saved step 2, exiting" in outputs[1]
    assert "[train] a peer's signal: saved step 2, exiting" in outputs[0]
    ckpts = checkpoint.TrainCheckpoints(tmp_path / "run", keep=2)
    assert ckpts.latest_step() == 2
    ckpts.close()
    assert not (tmp_path / "run" / "export").exists()
