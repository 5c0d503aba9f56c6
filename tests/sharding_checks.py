"""Run in a subprocess with 8 emulated CPU devices (see test_sharding.py); prints one JSON line
per check. Asserts it really has 8 devices: these checks never pass on fewer by accident."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import opt_jax  # noqa: E402
from opt_jax import layers, sharding, train  # noqa: E402
from opt_jax.training.experiment import base_config  # noqa: E402

assert len(jax.devices()) == 8, jax.devices()

CONFIG = opt_jax.OPTConfig(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=8,
    max_position_embeddings=64, init_std=0.3, dropout=0.0,
)  # fmt: skip
MESHES = {"data=8": (8, 1, 1), "fsdp=8": (1, 8, 1), "tensor=8": (1, 1, 8), "2x2x2": (2, 2, 2)}


def randomised_params():
    params = opt_jax.init_params(CONFIG, 0)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def leaves_with(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    return [
        (jax.tree_util.keystr(p), x, y)
        for (p, x), y in zip(flat_a, jax.tree.leaves(b), strict=True)
    ]


def main():
    model = opt_jax.OPTForCausalLM(CONFIG)
    params = randomised_params()
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 128, size=(8, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[3, :5] = 0
    ids[mask == 0] = 1
    optim = base_config().optim
    optim.warmup_steps, optim.schedule = 0, "constant"
    tx = train.make_optimizer(optim, 10)
    step = lambda s, b: train.train_step(s, b, jax.random.key(0), model=model, tx=tx, optim=optim)  # noqa: E731
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}

    # Single-device references.
    ref_logits = jax.jit(lambda p: model.apply({"params": p}, ids, attention_mask=mask).logits)(
        params
    )
    ref_state, ref_metrics = jax.jit(step)(train.fresh_state(params, tx), batch)
    ref_masks = np.asarray(
        jax.jit(lambda k: layers.keep_mask(k, (8, 12, 32), 0.1))(jax.random.key(3))
    )
    ref_tokens = opt_jax.generate(
        model, params, ids, mask, max_new_tokens=6, eos_token_id=[]
    ).sequences

    specs = opt_jax.param_logical_axes(CONFIG)
    for name, shape in MESHES.items():
        mesh = sharding.make_mesh(*shape)
        rules = sharding.DEFAULT_RULES
        shardings = sharding.logical_to_shardings(specs, mesh, rules)
        sharded = jax.device_put(params, shardings)
        q = sharded["model"]["decoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
        fc1 = sharded["model"]["decoder"]["layers_0"]["fc1"]["kernel"]
        emb = sharded["model"]["decoder"]["embed_tokens"]["embedding"]
        batch_sh = sharding.batch_sharding(mesh, rules)
        sharded_batch = jax.device_put(batch, batch_sh)
        with sharding.activate(mesh, rules):
            logits = jax.jit(
                lambda p, b: (
                    model.apply(
                        {"params": p}, b["input_ids"], attention_mask=b["attention_mask"]
                    ).logits
                )
            )(sharded, sharded_batch)
            abstract = jax.eval_shape(lambda p: train.fresh_state(p, tx), params)
            state_sh = sharding.logical_to_shardings(
                sharding.state_logical_specs(abstract, specs), mesh, rules
            )
            state = jax.jit(lambda p: train.fresh_state(p, tx), out_shardings=state_sh)(sharded)
            new_state, metrics = jax.jit(
                step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None)
            )(state, sharded_batch)
            cache = opt_jax.KVCache.init(CONFIG, 8, 16)
            prefill = jax.jit(
                lambda p, b, c: (
                    model.apply(
                        {"params": p}, b["input_ids"], attention_mask=b["attention_mask"], cache=c
                    ).cache
                )
            )(sharded, sharded_batch, cache)
            tokens = opt_jax.generate(
                model, sharded, ids, mask, max_new_tokens=6, eos_token_id=[]
            ).sequences
            # Dropout masks depend only on each element's coordinates (layers.keep_mask), so
            # one computed with activations sharded on this mesh equals the unsharded one.
            act = sharding.logical_to_shardings(
                jax.sharding.PartitionSpec(sharding.BATCH, sharding.LENGTH, sharding.MLP),
                mesh,
                rules,
            )
            masks = jax.jit(lambda k: layers.keep_mask(k, (8, 12, 32), 0.1), out_shardings=act)(
                jax.random.key(3)
            )
        mu = new_state.opt_state[1][0].mu["model"]["decoder"]["layers_0"]["fc1"]["kernel"]
        print(
            json.dumps(
                {
                    "mesh": name,
                    "q_proj_shard": list(q.sharding.shard_shape(q.shape)),
                    "fc1_shard": list(fc1.sharding.shard_shape(fc1.shape)),
                    "embed_shard": list(emb.sharding.shard_shape(emb.shape)),
                    "adam_mu_fc1_shard": list(mu.sharding.shard_shape(mu.shape)),
                    "logits_rel": rel(logits, ref_logits),
                    "dropout_masks_equal": bool((np.asarray(masks) == ref_masks).all()),
                    "dropout_masks_shard": list(masks.sharding.shard_shape(masks.shape)),
                    "loss_rel": rel(metrics["loss"], ref_metrics["loss"]),
                    # The key bias's true gradient is 0 (softmax is shift-invariant): Adam turns
                    # its float noise into lr-sized steps, so it is compared in absolute terms.
                    "params_rel": max(
                        rel(a, b)
                        for path, a, b in leaves_with(new_state.params, ref_state.params)
                        if "k_proj" not in path or "bias" not in path
                    ),
                    "k_bias_abs": max(
                        float(np.abs(np.asarray(a) - np.asarray(b)).max())
                        for path, a, b in leaves_with(new_state.params, ref_state.params)
                        if "k_proj" in path and "bias" in path
                    ),
                    "grad_norm_rel": rel(metrics["grad_norm"], ref_metrics["grad_norm"]),
                    "tokens_equal": bool((tokens == ref_tokens).all()),
                    "kv_cache_shard": list(
                        prefill.key[0].sharding.shard_shape(prefill.key[0].shape)
                    ),
                }
            ),
            flush=True,
        )


def lora_on_a_mesh():
    """LoRA adapters shard by their kernel's logical axes; sharded forward and unmerged
    generation equal one device's."""
    config = CONFIG.replace(lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj$", "fc1$"))
    base = randomised_params()
    params = opt_jax.lora.add_adapters(config, base, seed=0)
    params = jax.tree.map(lambda x: x + 0.1, params)  # non-zero B: the adapters count
    model = opt_jax.OPTForCausalLM(config)
    ids = np.random.RandomState(0).randint(3, 128, size=(8, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    ref = model.apply({"params": params}, ids, attention_mask=mask).logits
    ref_tokens = opt_jax.generate(model, params, ids, mask, max_new_tokens=4, eos_token_id=[])
    mesh, rules = sharding.make_mesh(2, 2, 2), sharding.DEFAULT_RULES
    shardings = sharding.logical_to_shardings(opt_jax.param_logical_axes(config), mesh, rules)
    sharded = jax.device_put(params, shardings)
    with sharding.activate(mesh, rules):
        logits = jax.jit(lambda p: model.apply({"params": p}, ids, attention_mask=mask).logits)(
            sharded
        )
        tokens = opt_jax.generate(model, sharded, ids, mask, max_new_tokens=4, eos_token_id=[])
    q = sharded["model"]["decoder"]["layers_0"]["self_attn"]["q_proj"]
    fc1 = sharded["model"]["decoder"]["layers_0"]["fc1"]
    shard = lambda x: list(x.sharding.shard_shape(x.shape))  # noqa: E731
    print(json.dumps({
        "mesh": "lora 2x2x2",
        "q_lora_A_shard": shard(q["lora_A"]), "q_lora_B_shard": shard(q["lora_B"]),
        "fc1_lora_A_shard": shard(fc1["lora_A"]), "fc1_lora_B_shard": shard(fc1["lora_B"]),
        "logits_rel": rel(logits, ref),
        "tokens_equal": bool((tokens.sequences == ref_tokens.sequences).all()),
    }), flush=True)  # fmt: skip


def quantized_on_a_mesh():
    """Quantised parameters shard by their logical axes (int4's packed out_proj rows with the
    heads, int8 kernels [*out, *in] with both); sharded logits and generation equal one
    device's."""
    base = randomised_params()
    ids = np.random.RandomState(0).randint(3, 128, size=(8, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mesh, rules = sharding.make_mesh(2, 2, 2), sharding.DEFAULT_RULES
    out = {"mesh": "quantized 2x2x2"}
    for method in ("int4", "llm_int8"):
        config, params = opt_jax.quantize(CONFIG, base, method, group_size=16)
        model = opt_jax.OPTForCausalLM(config)
        forward = jax.jit(lambda p: model.apply({"params": p}, ids, attention_mask=mask).logits)  # noqa: B023
        ref = forward(params)
        ref_tokens = opt_jax.generate(model, params, ids, mask, max_new_tokens=4, eos_token_id=[])
        shardings = sharding.logical_to_shardings(opt_jax.param_logical_axes(config), mesh, rules)
        sharded = jax.device_put(params, shardings)
        with sharding.activate(mesh, rules):
            logits = forward(sharded)
            tokens = opt_jax.generate(model, sharded, ids, mask, max_new_tokens=4, eos_token_id=[])
        kernel = sharded["model"]["decoder"]["layers_0"]["self_attn"]["out_proj"]["kernel"]
        out[method] = {
            "out_proj_shape": list(kernel.shape),
            "out_proj_shard": list(kernel.sharding.shard_shape(kernel.shape)),
            "logits_rel": rel(logits, ref),
            "tokens_equal": bool((tokens.sequences == ref_tokens.sequences).all()),
        }
    print(json.dumps(out), flush=True)


def compressed_on_a_mesh():
    """Calibration split over a mesh's data axes: each layer's Hessians are the one-device ones
    (summed over the data shards), GPTQ gives the same codes, and the packed format shards by
    its logical axes with the one-device logits."""
    from opt_jax import compress
    from opt_jax.compress import calibrate

    base = randomised_params()
    ids = np.random.RandomState(2).randint(3, 128, size=(16, 12)).astype(np.int32)
    mesh, rules = sharding.make_mesh(2, 2, 2), sharding.DEFAULT_RULES  # batch split 4 ways

    def record(sink):
        def compress_layer(index, layer, stats):
            sink.append(stats.hessian)
            return layer, layer

        return compress_layer

    one, split = [], []
    calibrate.walk(CONFIG, base, ids, record(one), batch_size=8)
    calibrate.walk(CONFIG, base, ids, record(split), batch_size=8, mesh=mesh)
    qconfig, single = compress.gptq(CONFIG, base, ids, bits=3, group_size=16, batch_size=8)
    _, meshed = compress.gptq(CONFIG, base, ids, bits=3, group_size=16, batch_size=8, mesh=mesh)
    codes = [
        (np.asarray(a) == np.asarray(b)).mean()
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(meshed), strict=True)
        if a.dtype == np.uint8
    ]
    model = opt_jax.OPTForCausalLM(qconfig)
    forward = jax.jit(lambda p: model.apply({"params": p}, ids).logits)
    shardings = sharding.logical_to_shardings(opt_jax.param_logical_axes(qconfig), mesh, rules)
    sharded = jax.device_put(single, shardings)
    with sharding.activate(mesh, rules):
        logits = forward(sharded)
    kernel = sharded["model"]["decoder"]["layers_0"]["self_attn"]["out_proj"]["kernel"]
    print(json.dumps({
        "mesh": "compressed 2x2x2",
        "hessian_rel": max(rel(split[i][k], one[i][k]) for i in range(2) for k in one[i]),
        "hessians": sorted(one[0]),
        "gptq_codes_equal": float(min(codes)),
        "out_proj_shard": list(kernel.sharding.shard_shape(kernel.shape)),
        "logits_rel": rel(logits, forward(single)),
    }), flush=True)  # fmt: skip


def restore_on_another_mesh(workdir):
    """Train with fsdp=8, then resume the same workdir on a tensor=4 x data=2 mesh. Reports the
    leaves of the state restored there (params, Adam moments, counters) that differ bitwise from
    the checkpoint, and the parameters that differ from the first run's export (written from
    its live state, not read back from the checkpoint)."""
    import orbax.checkpoint as ocp

    sys.path.insert(0, os.path.dirname(__file__))
    from train_helpers import tiny_train_config

    from opt_jax.checkpoints import orbax_io as checkpoint

    overrides = {"model.num_attention_heads": 4, "model.dropout": 0.0, "batch_size": 8}
    first = tiny_train_config(num_train_steps=2, checkpoint_every_steps=2, **overrides)
    first.mesh.update(data=1, fsdp=8, tensor=1)
    train.train_and_evaluate(first, workdir)
    exported = jax.device_get(checkpoint.load_params(os.path.join(workdir, "export"))[1])
    ckpts = checkpoint.TrainCheckpoints(workdir, keep=2)
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    saved = jax.device_get(ckpts.manager.restore(2, args=args)["state"])
    ckpts.close()
    second = tiny_train_config(num_train_steps=4, checkpoint_every_steps=2, **overrides)
    second.mesh.update(data=2, fsdp=1, tensor=4)
    restored = {}
    original = checkpoint.TrainCheckpoints.restore

    def spy(self, step, abstract_state):
        state, meta = original(self, step, abstract_state)
        q = state.params["model"]["decoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
        restored.update(
            host=jax.device_get(state),  # the training step donates (deletes) the original
            spec=str(q.sharding.spec),
            shard=list(q.sharding.shard_shape(q.shape)),
        )
        return state, meta

    checkpoint.TrainCheckpoints.restore = spy
    last = train.train_and_evaluate(second, workdir)
    from flax import serialization

    def flat(tree):  # path -> array, independent of container types (dataclass, dict, list)
        paths = jax.tree_util.tree_flatten_with_path(serialization.to_state_dict(tree))[0]
        return {tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): v for p, v in paths}

    def mismatched(a, b):  # leaves missing on either side or not bitwise equal, by name
        names = sorted(set(a) | set(b))
        return [
            "/".join(k) for k in names
            if k not in a or k not in b or not np.array_equal(np.asarray(a[k]), np.asarray(b[k]))
        ]  # fmt: skip

    ours, theirs = flat(restored["host"]), flat(saved)
    params, export = flat(restored["host"].params), flat(exported)
    print(
        json.dumps(
            {
                "state_leaves": len(ours),
                "param_leaves": len(params),
                "state_mismatched": mismatched(ours, theirs),
                "params_vs_export_mismatched": mismatched(params, export),
                "q_proj_spec": restored["spec"],
                "q_proj_shard": restored["shard"],
                "final_loss": last["loss"],
                "final_step": last["step"],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "restore":
        restore_on_another_mesh(sys.argv[2])
    else:
        main()
        lora_on_a_mesh()
        quantized_on_a_mesh()
        compressed_on_a_mesh()
