"""The serving engine's programs compiled for a TPU slice (scripts/aot_compile.py --workload
serve), as opt_jax/training/aot.py compiles the training step and generate's programs.

Axis legend: B slots (max_batch), T cache length (max_length), V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opt_jax.config import OPTConfig
from opt_jax.parallel import sharding
from opt_jax.serving import engine
from opt_jax.training import aot


def serving_programs(opt_config: OPTConfig, mesh, rules, batch: int, seq_len: int):
    """The serving engine's programs (opt_jax/serving/engine.py) at full load on a mesh: the
    prefill of one [1, T/2] prompt into a one-row T-slot cache (with every position's logits,
    which the engine keeps for echoed log-probabilities), the copy of that row into a slot,
    and the engine's decode step for all B slots (sampling from the carried logits, penalties
    and top log-probabilities included).

    Returns:
      ([Compiled prefill, Compiled insert, Compiled engine step], the abstract params)
    """
    params = aot.abstract_params_on(opt_config, mesh, rules)
    by_rows = sharding.batch_sharding(mesh, rules, 1)
    rows2 = sharding.batch_sharding(mesh, rules, 2)
    replicated = NamedSharding(mesh, P())
    vocab = opt_config.vocab_size
    state = engine.SlotState(
        cache=aot.abstract_cache_on(opt_config, mesh, rules, batch, seq_len),
        logits=jax.ShapeDtypeStruct((batch, vocab), jnp.float32, sharding=rows2),
        counts=jax.ShapeDtypeStruct((batch, vocab), jnp.int32, sharding=rows2),
        generated=jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=by_rows),
    )
    key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    keys = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=by_rows)
    options = {name: jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=by_rows)
               for name in ("temperature", "top_p", "presence", "frequency")}  # fmt: skip
    active = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=by_rows)
    # One request's prompt: a single row, so it is replicated over data x fsdp.
    prompt = jax.ShapeDtypeStruct((1, max(seq_len // 2, 1)), jnp.int32, sharding=replicated)
    prompt_mask = jax.ShapeDtypeStruct(prompt.shape, jnp.bool_, sharding=replicated)
    row = aot.abstract_cache_on(opt_config, mesh, rules, 1, seq_len)
    slot = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    # jitted as Engine._build jits them, with no head copy (a mesh decodes with the table)
    prefill = jax.jit(functools.partial(engine._prefill, opt_config, seq_len))
    insert = jax.jit(engine._insert, donate_argnums=(0,))
    step = jax.jit(functools.partial(engine._decode, opt_config), donate_argnums=(2,))
    with sharding.activate(mesh, rules):
        return [
            aot.compile_program("engine_prefill", prefill, params, None, prompt, prompt_mask),
            aot.compile_program("engine_insert", insert, state, row, slot),
            aot.compile_program("engine_step", step, params, None, state, active, options, keys),
        ], params
