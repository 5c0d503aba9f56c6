"""Training: `train_and_evaluate`, the loop around the jitted step of step.py.

`train_and_evaluate(config, workdir)` reads straight through: mesh, data, model + optimizer,
sharded init, restore, jitted step, loop. Resume order: the latest checkpoint in the workdir,
else `config.init_from`, else a fresh init. Batch `step` and the dropout key
`fold_in(key(seed), step)` are pure functions of the step, so a resumed run repeats an
uninterrupted one bit for bit (on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opt_jax import lora
from opt_jax.checkpoints import orbax_io as checkpoint
from opt_jax.checkpoints import peft
from opt_jax.checkpoints.hf import load_pretrained, save_pretrained
from opt_jax.config import ARCHITECTURE_FIELDS, OPTConfig
from opt_jax.generation.text import generate_text
from opt_jax.model import (
    OPTForCausalLM,
    abstract_params,
    initializable,
    model_for,
    param_logical_axes,
)
from opt_jax.parallel import sharding
from opt_jax.param_tree import stack_layers, unstack_layers
from opt_jax.planning import roofline
from opt_jax.quantization import quantize
from opt_jax.training import data, objectives
from opt_jax.training.experiment import lora_fields, model_config
from opt_jax.training.metrics import MetricsWriter
from opt_jax.training.step import (  # noqa: F401  (re-exported: the loop's building blocks)
    TrainState,
    eval_step,
    fresh_state,
    lm_loss,
    make_optimizer,
    make_schedule,
    train_step,
)
from opt_jax.validation import validate_token_ids


# ---------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------
def _architecture_diff(a: OPTConfig, b: OPTConfig) -> list[str]:
    return [
        f"{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}"
        for f in ARCHITECTURE_FIELDS
        if getattr(a, f) != getattr(b, f)
    ]


def _model_overrides(config) -> dict:
    """The config.model fields that are set (dropout, dtypes, scan/remat/attention choices...)."""
    return {k: v for k, v in config.model.items() if k != "preset" and v is not None}


def _requests_architecture(config) -> bool:
    m = config.model
    return bool(m.preset) or any(m[f] is not None for f in ARCHITECTURE_FIELDS if f in m)


def check_config(config, num_devices: int, workdir: str, latest: int | None) -> None:
    """Everything checkable before the data is prepared, so a bad flag fails in seconds.

    Args:
      config: the experiment config (ml_collections).
      num_devices: data-parallel devices the batch is split over.
      latest: the workdir's latest checkpoint step (None: starting fresh).

    Raises:
      ValueError: naming the field and the limit.
    """
    for name in ("num_train_steps", "batch_size", "seq_len", "log_every_steps",
                 "keep_checkpoints", "stop_check_every_steps"):  # fmt: skip
        if config[name] <= 0:
            raise ValueError(f"config.{name} must be positive, got {config[name]}")
    accum = config.optim.grad_accum_steps
    if accum <= 0:
        raise ValueError(f"optim.grad_accum_steps must be positive, got {accum}")
    if config.init_from and latest is not None:  # resuming a fine-tune
        limit = OPTConfig.from_hf(os.path.join(workdir, "model")).max_position_embeddings
    elif config.init_from:
        if not os.path.isdir(config.init_from):
            raise ValueError(f"init_from {config.init_from!r} is not a directory")
        limit = OPTConfig.from_hf(config.init_from).max_position_embeddings
    else:
        limit = model_config(config, config.data.vocab_size).max_position_embeddings
    if config.seq_len > limit:
        raise ValueError(
            f"seq_len {config.seq_len} exceeds the model's max_position_embeddings {limit}"
        )
    if latest is None:
        data.tokenizer_source(config)  # init_from without a tokenizer: an error now, not later
    if config.batch_size % num_devices:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {num_devices} data-parallel "
            "devices"
        )
    if (config.batch_size // num_devices) % accum:
        raise ValueError(
            f"the per-device batch {config.batch_size // num_devices} is not divisible by "
            f"optim.grad_accum_steps {accum}"
        )


def resolve_model(config, workdir: str, resuming: bool, task):
    """The model to train and, when fine-tuning from scratch, its initial parameters.

    Resume order: a run resuming its own checkpoint takes the architecture it saved at its
    start (WORKDIR/model); else `init_from`'s checkpoint (with the config's dropout / dtype /
    layout overrides, which must not change its architecture); else `config.model` (vocabulary
    from the tokenizer). The head is the task's: a language model's decoder gets a fresh
    classification / QA head (HF's init), a checkpoint with the task's head keeps it.

    Returns:
      (OPTConfig, params or None)
    """
    dtypes = {"dtype": config.model.dtype, "param_dtype": config.model.param_dtype}
    head = {"architecture": task.architecture}
    if task.label_names:
        head["id2label"] = task.label_names
    if config.init_from and resuming:  # the architecture was saved when the fine-tune began
        saved = OPTConfig.from_hf(os.path.join(workdir, "model"))
        if task.label_names and saved.label_names != task.label_names:
            raise ValueError(
                f"the training data's labels {task.label_names} differ from those {workdir} "
                f"was trained with {saved.label_names}; resume with the original data"
            )
        return dataclasses.replace(saved, **_model_overrides(config), **lora_fields(config)), None
    if not config.init_from:
        return model_config(config, task.tokenizer.vocab_size).replace(**head), None
    path = config.init_from
    if os.path.isdir(os.path.join(path, checkpoint.PARAMS_DIR)):
        init_config, params = checkpoint.load_params(path, **dtypes)
    else:
        stored = OPTConfig.from_hf(path).architecture
        keep = stored == task.architecture
        init_config, params = load_pretrained(
            path, architecture=stored if keep else "OPTForCausalLM", **dtypes
        )
    if _requests_architecture(config):
        diff = _architecture_diff(model_config(config, task.tokenizer.vocab_size), init_config)
        if diff:
            raise ValueError(
                f"init_from {path} does not match the model config: " + "; ".join(diff)
            )
    opt_config = dataclasses.replace(
        init_config, **_model_overrides(config), **lora_fields(config), **head
    )
    params = _with_head(init_config, opt_config, params, config.seed, path)
    method = config.lora.get("quantize_base", "") if "lora" in config else ""
    if method:  # QLoRA: the frozen base is quantised before the adapters are added
        if not opt_config.lora_rank or task.architecture != "OPTForCausalLM":
            raise ValueError(
                "lora.quantize_base quantises the frozen base of a LoRA fine-tune: it needs "
                "lora.rank > 0 and a language-modelling task"
            )
        quantized, params = quantize(
            opt_config.replace(lora_rank=0, scan_layers=init_config.scan_layers), params, method
        )
        opt_config = opt_config.replace(quantization=quantized.quantization)
    if opt_config.scan_layers != init_config.scan_layers:
        params = (stack_layers(params, opt_config.num_hidden_layers) if opt_config.scan_layers
                  else unstack_layers(params))  # fmt: skip
    if opt_config.lora_rank:  # fresh adapters (PEFT's init: the model is unchanged at step 0)
        params = lora.add_adapters(opt_config, params, seed=config.seed)
    return opt_config, params


HEADS = tuple(lora.HEADS.values())  # task heads: "score" (classification), "qa_outputs"


def _with_head(init_config: OPTConfig, config: OPTConfig, params: dict, seed: int, path: str):
    """init_from's params with the head `config.architecture` needs: kept when the checkpoint
    has it (with as many classes), else the decoder plus a fresh head (normal(init_std)
    kernel, zero bias: HF's init)."""
    if init_config.architecture == config.architecture:
        if config.label_names != init_config.label_names and config.architecture.endswith(
            "Classification"
        ):
            raise ValueError(
                f"init_from {path} classifies into {init_config.label_names}, the training data "
                f"has labels {config.label_names}"
            )
        return params
    fresh = abstract_params(config.replace(scan_layers=False, lora_rank=0))
    key = jax.random.key(seed)
    out = {"model": params["model"]}
    for name in HEADS:
        if name in fresh:
            out[name] = {
                leaf: (
                    jax.random.normal(jax.random.fold_in(key, i), spec.shape, spec.dtype)
                    * config.init_std
                    if leaf == "kernel"
                    else jnp.zeros(spec.shape, spec.dtype)
                )
                for i, (leaf, spec) in enumerate(sorted(fresh[name].items()))
            }
    return out


def _write_run_config(config, workdir: str, start: int) -> None:
    """WORKDIR/train_config.json records the run's config; written once checks have passed.
    A resume with a changed config keeps the original and writes train_config.step_N.json."""
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    path = os.path.join(workdir, "train_config.json")
    if start and os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
        path = os.path.join(workdir, f"train_config.step_{start}.json")
        print(f"[train] the config differs from the run's original: recorded in {path}", flush=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _due(done: int, every: int, final: bool) -> bool:
    """The "every N steps, and at the last step" cadence (N <= 0: never)."""
    return every > 0 and (done % every == 0 or final)


def _metrics_record(metrics, done: int, step_time: float, schedule, rates: dict) -> dict:
    """The metrics.jsonl row of a logging step.

    Args:
      metrics: the train step's metrics, on the host.
      rates: tokens_per_step, device_flops (model FLOPs per device per step) and peaks (the
        accelerator's data-sheet peaks, or None).
    """
    record = {
        "loss": float(metrics["loss"]),
        # The rate of the latest applied update: skipped steps do not advance the optimiser's
        # count, so the schedule runs on applied updates.
        "learning_rate": float(schedule(max(done - int(metrics["skipped"]) - 1, 0))),
        "grad_norm": float(metrics["grad_norm"]),
        "skipped": int(metrics["skipped"]),
        "tokens_per_s": rates["tokens_per_step"] / step_time,
        "step_time": step_time,
        "tflops_per_device": rates["device_flops"] / step_time / 1e12,
    }
    if rates["peaks"]:  # an accelerator whose data-sheet peak is known
        record["mfu"] = rates["device_flops"] / step_time / rates["peaks"]["flops"]
    return record


def _agree_to_stop(signalled: bool, done: int, every: int) -> bool:
    """Whether every process stops after step `done`.

    A preemption signal may reach the processes of a multi-host job at different steps, but the
    save that follows is collective: one process must not decide alone. So with several
    processes the flags are all-gathered every `every` steps (config.stop_check_every_steps)
    and all stop together if any was signalled.
    """
    if jax.process_count() == 1:
        return signalled
    if done % every:
        return False
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(signalled))))


def _sample(opt_config, params, tokenizer, config) -> str:
    model = OPTForCausalLM(opt_config)
    room = opt_config.max_position_embeddings - len(tokenizer.encode(config.sample_prompt))
    budget = min(config.sample_tokens, room)
    if budget < 1:
        return ""
    return generate_text(model, params, tokenizer, [config.sample_prompt], max_new_tokens=budget)[0]


def run_summary(config, opt_config: OPTConfig, workdir: str, start: int, data_line: str) -> str:
    """A few lines saying what this run is (the whole config is in WORKDIR/train_config.json).

    data_line: the task's description of its data.
    """
    size = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(opt_config)))
    source = config.init_from or (config.model.preset and f"preset {config.model.preset}")
    steps = f"{config.num_train_steps} steps of {config.batch_size} x {config.seq_len} tokens"
    head = "" if opt_config.architecture == "OPTForCausalLM" else f", {opt_config.architecture}"
    return "\n".join([
        f"[train] model: {size / 1e6:.1f}M parameters, {opt_config.num_hidden_layers} layers x "
        f"{opt_config.hidden_size} wide, vocabulary {opt_config.vocab_size}{head}"
        + (f", from {source}" if source else ", random init"),
        f"[train] data: {data_line}; {steps}"
        + (f", resuming at step {start}" if start else ""),
        f"[train] outputs: {workdir} (metrics.jsonl, checkpoints, export/; "
        "config in train_config.json)",
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict:
    """Trains per the experiment `config`, checkpointing into `workdir`; returns the last
    logged metrics."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0

    # -- Mesh: data / fsdp / tensor parallelism chosen by the config's mesh shape ------------
    mesh = sharding.mesh_from_config(config.mesh)
    rules = sharding.rules_from_config(config.sharding_rules)

    # -- Checks that need no data (tokenizing a corpus can take long) -------------------------
    ckpts = checkpoint.TrainCheckpoints(workdir, config.keep_checkpoints)
    latest = ckpts.latest_step()
    check_config(config, sharding.data_parallel_size(mesh, rules), workdir, latest)

    # -- Data: the task (language modelling, classification, QA) reads and checks it -------------
    task = objectives.build(config, workdir, resuming=latest is not None)
    tokenizer, train_ds = task.tokenizer, task.train

    # -- Model and optimiser ----------------------------------------------------------------
    opt_config, init_params = resolve_model(config, workdir, latest is not None, task)
    for name, ids in task.token_arrays().items():
        validate_token_ids(ids, opt_config.vocab_size, name=name)
    model = model_for(opt_config)
    tx = make_optimizer(config.optim, config.num_train_steps)
    # LoRA trains the adapters and a task head only: nothing else is differentiated or updated.
    trainable = lora.is_trained if opt_config.lora_rank else None

    # -- State: restored, or created directly with its shardings --------------------------------
    state, state_sharding, start = _initial_state(
        config, workdir, ckpts, latest, opt_config, model, tx, trainable, init_params, mesh, rules
    )
    del init_params
    if is_main:  # every check has passed: record what this run is
        _write_run_config(config, workdir, start)
        opt_config.save_hf(os.path.join(workdir, "model"))
        summary = run_summary(config, opt_config, workdir, start, task.describe())
        print(summary, flush=True)

    # -- Jitted steps ----------------------------------------------------------------------------
    def place(local):  # this process's rows -> global arrays split over the data axes
        return {
            k: jax.make_array_from_process_local_data(
                sharding.batch_sharding(mesh, rules, v.ndim), v
            )
            for k, v in local.items()
        }

    step_fn, eval_fn = _compiled_steps(config, model, tx, task, trainable, state_sharding,
                                       train_ds.batch(0), mesh, rules)  # fmt: skip
    rng = jax.random.key(config.seed)

    def evaluate(params):
        return task.evaluate(lambda local: jax.device_get(eval_fn(params, place(local))), workdir)

    # -- Loop -----------------------------------------------------------------------------------
    writer = MetricsWriter(workdir, start, config.num_train_steps, enabled=is_main)
    schedule = make_schedule(config.optim, config.num_train_steps)
    rates = _rates(config, opt_config)
    last, logged_step, timer, stopping = {}, start, time.time(), False
    try:
        with _sigterm_flag() as stop:  # held until the checkpoint is written
            with sharding.activate(mesh, rules):
                for step in range(start, config.num_train_steps):
                    local = train_ds.batch(step, jax.process_index(), jax.process_count())
                    state, metrics = step_fn(state, place(local), rng)
                    done = step + 1
                    final = done == config.num_train_steps
                    alone = jax.process_count() == 1
                    if _due(done, config.log_every_steps, final) or (alone and stop["signal"]):
                        metrics = jax.device_get(metrics)  # waits for the step: time it after
                        step_time = (time.time() - timer) / max(done - logged_step, 1)
                        record = _metrics_record(metrics, done, step_time, schedule, rates)
                        record["epoch"] = train_ds.epoch_of(done)
                        if hasattr(train_ds, "metrics"):  # tokens and epochs per token store
                            record.update(train_ds.metrics(done))
                        if _due(done, config.eval_every_steps, final):
                            record.update(evaluate(state.params))
                        if _due(done, config.sample_every_steps, final) and task.generates:
                            record["sample"] = _sample(opt_config, state.params, tokenizer, config)
                        writer.write(done, record)
                        writer.progress(done, {k: v for k, v in record.items() if k != "sample"})
                        last, logged_step, timer = {"step": done, **record}, done, time.time()
                    stopping = _agree_to_stop(
                        stop["signal"] is not None, done, config.stop_check_every_steps
                    )
                    if _due(done, config.checkpoint_every_steps, final) or stopping:
                        ckpts.save(done, state, {"model": opt_config.to_hf(), "step": done})
                    if stopping:
                        why = f"signal {stop['signal']}" if stop["signal"] else "a peer's signal"
                        print(f"[train] {why}: saved step {done}, exiting", flush=True)
                        break
            ckpts.wait()
            if not stopping:
                _export(
                    workdir, opt_config, state.params, tokenizer, is_main, hf=not task.generates
                )
    finally:
        ckpts.close()
        writer.close()
    return last


def _initial_state(config, workdir, ckpts, latest, opt_config, model, tx, trainable,
                   init_params, mesh, rules):  # fmt: skip
    """The train state, created directly with its shardings: restored from checkpoint `latest`,
    else from `init_params` (init_from), else a fresh init from `config.seed`.

    Returns:
      (state, its NamedShardings, the step it is at)
    """

    def init_state(rng):
        params = nn.unbox(initializable(model).init(rng, jnp.ones((1, 1), jnp.int32))["params"])
        return fresh_state(params, tx, trainable)

    rng = jax.random.key(config.seed)
    abstract = jax.eval_shape(init_state, rng)  # shapes first: nothing is materialised whole
    param_specs = param_logical_axes(opt_config, model)
    sharding.check_divisible(abstract.params, param_specs, dict(mesh.shape), rules)
    state_specs = sharding.state_logical_specs(abstract, param_specs)
    state_sharding = sharding.logical_to_shardings(state_specs, mesh, rules)
    if latest is not None:
        saved = OPTConfig.from_hf(ckpts.read_meta(latest)["model"])
        diff = _architecture_diff(opt_config, saved)
        if diff:
            raise ValueError(
                f"workdir {workdir} holds a checkpoint of a different model: " + "; ".join(diff)
            )
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract,
            state_sharding,
        )
        state, _ = ckpts.restore(latest, target)
        return state, state_sharding, int(state.step)
    if init_params is not None:
        params = jax.device_put(init_params, state_sharding.params)
        fresh = jax.jit(lambda p: fresh_state(p, tx, trainable), out_shardings=state_sharding)
        return fresh(params), state_sharding, 0
    return jax.jit(init_state, out_shardings=state_sharding)(rng), state_sharding, 0


def _compiled_steps(config, model, tx, task, trainable, state_sharding, example_batch, mesh,
                    rules):  # fmt: skip
    """The jitted train step (state, batch, rng) -> (state, metrics), donating the state, and
    the eval step (params, batch) -> the task's outputs, replicated on every process."""
    replicated = NamedSharding(mesh, P())
    # Every batch array is split over the data-parallel axes along its first (batch) axis.
    batch_sharding = {
        k: sharding.batch_sharding(mesh, rules, v.ndim) for k, v in example_batch.items()
    }
    step_fn = jax.jit(
        lambda s, b, r: train_step(
            s, b, r, model=model, tx=tx, optim=config.optim, loss_fn=task.loss,
            trainable=trainable,
        ),
        in_shardings=(state_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )  # fmt: skip
    eval_fn = jax.jit(
        lambda p, b: task.eval_outputs(
            model.apply({"params": p}, b["input_ids"], attention_mask=b["attention_mask"]), b
        ),
        out_shardings=replicated,  # every process reads the whole batch's outputs
    )
    return step_fn, eval_fn


def _rates(config, opt_config) -> dict:
    """What turns a step time into tokens/s, TFLOP/s and MFU (see _metrics_record)."""
    tokens_per_step = config.batch_size * config.seq_len
    # Model FLOPs per step (forward + backward = 3 x forward), per device.
    step_flops = 3 * roofline.model_flops_per_token(opt_config, config.seq_len) * tokens_per_step
    return {
        "tokens_per_step": tokens_per_step,
        "device_flops": step_flops / jax.device_count(),
        "peaks": roofline.local_device_peaks(opt_config.dtype),
    }


@contextlib.contextmanager
def _sigterm_flag():
    """Within: SIGTERM (preemption) sets flag["signal"] instead of killing the process, so the
    loop finishes its step, saves and exits. The previous handler is restored after."""
    flag = {"signal": None}

    def on_sigterm(signum, frame):
        flag["signal"] = signum

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: signals cannot be caught there
        previous = None
    try:
        yield flag
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _export(workdir, cfg, params, tokenizer, is_main, hf=False):
    """Params-only export for inference (generate.py --model WORKDIR/export), written by every
    process (orbax gathers the shards) and swapped in whole: a crash never leaves a half-written
    export. A LoRA run exports the merged model, and its adapters as a PEFT directory in
    WORKDIR/adapter (a QLoRA run exports its quantised base with the adapters beside it). `hf`:
    an HF directory (safetensors) instead, which transformers'
    OPTForSequenceClassification / OPTForQuestionAnswering load (the task heads' export)."""
    if cfg.lora_rank:
        if is_main:
            adapter = os.path.join(workdir, "adapter")
            shutil.rmtree(adapter + ".tmp", ignore_errors=True)
            peft.save_adapter(adapter + ".tmp", cfg, params)
            shutil.rmtree(adapter, ignore_errors=True)
            os.replace(adapter + ".tmp", adapter)
        if cfg.quantization == "none":  # a quantised (QLoRA) base keeps its adapters unmerged
            cfg, params = lora.merge(cfg, params)
    export, staging = (os.path.join(workdir, n) for n in ("export", "export.tmp"))
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
    sharding.sync("export-staging-clean")
    if hf:
        if jax.process_count() > 1:  # every process takes part in gathering the shards
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        if cfg.scan_layers:
            cfg, params = cfg.replace(scan_layers=False), unstack_layers(params)
        if is_main:
            save_pretrained(staging, cfg, params)
    else:
        checkpoint.save_params(staging, cfg, params)
    if is_main:
        tokenizer.save(staging)
        shutil.rmtree(export, ignore_errors=True)
        os.replace(staging, export)
    sharding.sync("export-done")
