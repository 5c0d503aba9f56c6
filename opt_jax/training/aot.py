"""Compile the programs users run for a TPU slice, on any machine, and read what the TPU
compiler says each chip needs.

`jax[tpu]` brings libtpu, and `jax.experimental.topologies.get_topology_desc` gives abstract
devices of a named slice ("v5e:2x4", "v5p:4x4x4", ...): `jit(...).lower(...).compile()` for
them runs the real TPU compiler on a CPU machine. Nothing is run. What comes back per chip:
argument, output, temporary and aliased bytes (`memory_analysis()`), the collectives in the
compiled HLO, the compile time. (`cost_analysis()` is not used: for TPU targets its
`optimal_seconds` came back negative and a scanned layer counts once.)

Axis legend: B global batch, T sequence length, L layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opt_jax.config import OPTConfig
from opt_jax.kv_cache import KV_AXES, KVCache
from opt_jax.ops import quantized
from opt_jax.parallel import sharding
from opt_jax.param_tree import as_words, is_layer_kernel
from opt_jax.planning.memory import compiled_train_step_bytes

GiB = 1024**3
# HBM per chip by TPU generation (Google Cloud's published figures).
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
HEADROOM = 0.95  # a program "fits" when its bytes are within 95% of the chip's HBM
_TOPOLOGY = re.compile(r"(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def topology_devices(name: str) -> list:
    """The abstract TPU devices of slice `name` ("v5e:2x2", "v5p:2x2x1", ...).

    Raises:
      ValueError: a name that is not GENERATION:AxB[xC] of a known generation, or that libtpu
        does not know; or no libtpu installed (pip install "jax[tpu]").
    """
    topology_chips(name)  # a malformed name: one-line error before libtpu loads
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock file unless told that other processes may load it too
    # (a test process and the script it runs, two compiles side by side).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu's errors are RuntimeErrors / XlaRuntimeErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"TPU topology {name!r} could not be made: {first}") from e


def topology_chips(name: str) -> tuple[str, int]:
    """(generation, chips) of slice `name` read off the name alone ("v5p:4x4x4" -> ("v5p", 64)),
    without libtpu (what plan_memory.py --search plans for); a malformed name is an error."""
    match = _TOPOLOGY.fullmatch(name)
    if not match:
        raise ValueError(
            f"unknown TPU topology {name!r}: write GENERATION:AxB or AxBxC with a generation "
            f"of {sorted(HBM_BYTES)} (e.g. v5e:2x4, v5p:2x2x2)"
        )
    generation, *dims = match.groups()
    return generation, math.prod(int(d) for d in dims if d)


def chip_hbm_bytes(name: str) -> int:
    return HBM_BYTES[name.split(":")[0]]


def make_mesh(name: str, mesh: tuple[int, int, int]):
    """A (data, fsdp, tensor) mesh over slice `name`'s chips; its size must be the chip count."""
    devices = topology_devices(name)
    if math.prod(mesh) != len(devices):
        raise ValueError(
            f"mesh {'x'.join(map(str, mesh))} (data x fsdp x tensor) has {math.prod(mesh)} "
            f"devices, topology {name} has {len(devices)} chips"
        )
    return sharding.make_mesh(*mesh, devices=devices)


def check_heads(config: OPTConfig, tensor: int) -> None:
    if config.num_attention_heads % tensor or config.ffn_dim % tensor:
        raise ValueError(
            f"the tensor axis ({tensor}) must divide the heads ({config.num_attention_heads}) and "
            f"ffn_dim ({config.ffn_dim})"
        )


# ---------------------------------------------------------------------------------------------
# What the compiled program says
# ---------------------------------------------------------------------------------------------
_SHAPE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32,
         "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64}  # fmt: skip
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_WHILE = re.compile(r"\bwhile\(.*?condition=%?([\w.\-]+).*?body=%?([\w.\-]+)")
_TRIPS = re.compile(r"\"known_trip_count\":\{\"n\":\"(\d+)\"")
_COUNTER_LIMIT = re.compile(r"= s32\[\]\S* constant\((\d+)\)")
# Computations the TPU compiler names after the collective they fuse (called by kCustom fusions).
_FUSED_COLLECTIVES = {"all-reduce-scatter": "reduce-scatter", "reduce-scatter": "reduce-scatter",
                      "all-gather": "all-gather", "all-reduce": "all-reduce",
                      "all-to-all": "all-to-all"}  # fmt: skip
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-, %]+)")


def _result_bytes(text: str) -> int:
    """Bytes of an HLO result type (a shape or a tuple of shapes)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += count * _BITS[dtype] // 8
    return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} of the collectives one run of the program executes: each op's
    result bytes, ops inside a while loop (scanned layers, gradient accumulation) counted per
    iteration (the trip count XLA annotates, else the limit its condition compares against).
    An async start/done pair counts once (at its start)."""
    ops: dict[str, list] = {}
    calls: dict[str, list] = {}
    limits: dict[str, int] = {}  # a loop condition's counter limit (its largest s32 constant)
    loops: dict[str, list] = {}  # computation -> [(condition, body, known trip count or None)]
    entry, current = None, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line) if line[:1] not in ("", " ", "}") else None
        if head:
            current = head.group(1)
            ops[current], calls[current], loops[current] = [], [], []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        op = _OP.search(line)
        if op:
            result = op.group(1)
            if op.group(3) and result.startswith("("):  # async start: (operands, outputs, ..)
                shapes = _SHAPE.findall(result)
                result = " ".join(f"{d}[{s}]" for d, s in shapes[len(shapes) // 2 :])
            ops[current].append((op.group(2), _result_bytes(result)))
        limit = _COUNTER_LIMIT.search(line)
        if limit:
            limits[current] = max(limits.get(current, 0), int(limit.group(1)))
        loop = _WHILE.search(line)
        if loop:
            trips = _TRIPS.search(line)
            loops[current].append((loop.group(1), loop.group(2), trips and int(trips.group(1))))
        elif "calls=" in line or "to_apply=" in line or "branch_computations=" in line:
            for names in _CALLS.findall(line):
                for callee in re.split(r"[,\s]+", names.replace("%", "")):
                    kind = _FUSED_COLLECTIVES.get(callee.split(".")[0])
                    if kind:  # TPU: a collective fused with its operands (its result's bytes)
                        ops[current].append((kind, _result_bytes(line.split(" fusion(")[0])))
                    elif callee:
                        calls[current].append((callee, 1))
    out = {name: {"count": 0, "bytes": 0} for name in COLLECTIVES}

    def visit(name, times, depth=0):
        if name not in ops or depth > 50:
            return
        for kind, nbytes in ops[name]:
            out[kind]["count"] += times
            out[kind]["bytes"] += times * nbytes
        for callee, n in calls[name]:
            visit(callee, times * n, depth + 1)
        for condition, body, trips in loops[name]:
            # XLA:CPU annotates the trip count; the TPU compiler leaves the counter's limit in
            # the condition (a scan over layers, gradient accumulation: counted from 0 by 1).
            visit(body, times * (trips or limits.get(condition, 1)), depth + 1)

    if entry is not None:
        visit(entry, 1)
    return out


def _bytes(compiled) -> dict[str, int]:
    out = compiled_train_step_bytes(compiled)
    # Donated (aliased) outputs reuse their arguments' memory.
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    # Arguments in host memory (OPTConfig.layer_memory="pinned_host"), not in the HBM total.
    out["host_arguments"] = int(compiled.memory_analysis().host_argument_size_in_bytes)
    return out


@dataclasses.dataclass
class Compiled:
    """One compiled program: its per-chip bytes, collectives, compile seconds and the
    executable (None when the compiler refused it for want of memory: `error` says so)."""

    name: str
    bytes_per_chip: dict
    collectives: dict
    compile_seconds: float
    executable: object
    error: str | None = None


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# The TPU compiler's refusal: "... the total memory required for HLO temporaries (114.07G)
# exceeds available HBM (15.75G)" (the program needs more than the chip has). Despite the
# wording the figure is the program's whole need, its arguments included: a program holding a
# 17 GiB argument and nothing else is refused with "(17.00G)" (tests/test_aot.py).
_OUT_OF_HBM = re.compile(r"temporaries \(([\d.]+)([KMGT]?)\)")


def _abstract_bytes(args) -> int:
    """Per-chip bytes of abstract sharded arguments (a PRNG key counts its two uint32 words)."""
    total = 0
    for x in jax.tree.leaves(args):
        if not isinstance(x, jax.ShapeDtypeStruct):
            continue
        shape = x.shape if x.sharding is None else x.sharding.shard_shape(x.shape)
        itemsize = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x.dtype.itemsize
        total += math.prod(shape) * itemsize
    return total


def _platform(args) -> str | None:
    """The platform of the devices the abstract arguments are sharded over (None: none are)."""
    for x in jax.tree.leaves(args):
        sharding_ = getattr(x, "sharding", None)
        if sharding_ is not None:
            return next(iter(sharding_.device_set)).platform
    return None


def compile_program(name: str, fn, *args) -> Compiled:
    """Lowers and compiles `fn` for `args` (abstract, sharded). A program the compiler refuses
    for lack of HBM comes back with the bytes its message names (arguments included) and no
    executable."""
    began = time.perf_counter()
    with quantized.target_platform(_platform(args)):  # traced here, for the slice's chips
        lowered = fn.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as e:  # jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED
        found = _OUT_OF_HBM.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        required = int(float(found.group(1)) * _UNITS[found.group(2)])
        arguments = _abstract_bytes(args)
        sizes = {"arguments": arguments, "outputs": 0, "aliased": 0,
                 "temporaries": max(required - arguments, 0),
                 "total": max(required, arguments)}  # fmt: skip
        empty = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
        message = str(e).strip().splitlines()[0]
        return Compiled(name, sizes, empty, time.perf_counter() - began, None, message)
    seconds = time.perf_counter() - began
    return Compiled(name, _bytes(compiled), collectives(compiled.as_text()), seconds, compiled)


# ---------------------------------------------------------------------------------------------
# Saved executables
# ---------------------------------------------------------------------------------------------
def _runtime() -> dict:
    """What a serialized executable needs of the process that loads it."""
    import jaxlib

    try:
        from importlib.metadata import version

        libtpu = version("libtpu")
    except Exception:  # no libtpu installed (a CPU or GPU machine)
        libtpu = None
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "libtpu": libtpu}


def save_executable(directory: str, name: str, compiled, about: dict | None = None) -> str:
    """Writes `compiled` (a jax Compiled) as DIRECTORY/NAME.exe, serialized with
    jax.experimental.serialize_executable, and DIRECTORY/NAME.json: the platform, device kind
    and count and the jax / jaxlib / libtpu versions it was compiled with (a loading process
    must match them), plus `about` (what was compiled: topology, mesh, shapes). Both files are
    written under temporary names and renamed, so a failed save leaves no half file. Returns
    the .exe path."""
    import pickle

    from jax.experimental.serialize_executable import serialize

    payload, in_tree, out_tree = serialize(compiled)
    devices = set()
    for leaf in jax.tree.leaves(compiled.input_shardings):
        devices |= leaf.device_set
    device = min(devices, key=lambda d: d.id, default=None)
    manifest = {
        "program": name,
        "platform": None if device is None else device.platform,
        "device_kind": None if device is None else device.device_kind,
        "devices": len(devices),
        **_runtime(),
        "about": about or {},
    }
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.exe")
    files = {path: pickle.dumps((payload, in_tree, out_tree)),
             path[: -len(".exe")] + ".json": json.dumps(manifest, indent=2).encode()}  # fmt: skip
    for target, data in files.items():
        with open(target + ".tmp", "wb") as f:
            f.write(data)
        os.replace(target + ".tmp", target)
    return path


def load_executable(path: str):
    """The callable executable save_executable wrote to `path` (NAME.exe), loaded onto this
    process's devices.

    Raises:
      ValueError: one line, when this process cannot run it: another platform or device kind,
        too few devices, or other jax / jaxlib / libtpu versions than it was compiled with.
    """
    import pickle

    from jax.experimental.serialize_executable import deserialize_and_load

    with open(path[: -len(".exe")] + ".json") as f:
        manifest = json.load(f)
    here = jax.devices()
    problems = [
        f"{key} {manifest[key]} (this process: {value})"
        for key, value in _runtime().items()
        if manifest[key] != value
    ]
    if manifest["platform"] != here[0].platform or manifest["device_kind"] != here[0].device_kind:
        problems.insert(0, f"{manifest['device_kind']} ({manifest['platform']}) chips (this "
                           f"process has {here[0].device_kind} ({here[0].platform}))")  # fmt: skip
    elif manifest["devices"] > len(here):
        problems.insert(0, f"{manifest['devices']} devices (this process has {len(here)})")
    if problems:
        raise ValueError(f"{path} was compiled for {'; '.join(problems)}: recompile it here")
    with open(path, "rb") as f:
        payload, in_tree, out_tree = pickle.load(f)
    return deserialize_and_load(payload, in_tree, out_tree)


# ---------------------------------------------------------------------------------------------
# The programs
# ---------------------------------------------------------------------------------------------
def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def train_programs(experiment, opt_config: OPTConfig, mesh, rules, batch: int, seq_len: int):
    """The training step of `experiment` (an ml_collections experiment config) for `opt_config`
    on `mesh`, as training/train.py jits it, with abstract sharded state and batch.

    Returns:
      ([Compiled], the abstract state with shardings)
    """
    import flax.linen as nn

    from opt_jax import lora
    from opt_jax.model import initializable, model_for, param_logical_axes
    from opt_jax.training.objectives import LanguageModelling
    from opt_jax.training.step import fresh_state, make_optimizer, train_step

    model = model_for(opt_config)
    tx = make_optimizer(experiment.optim, experiment.num_train_steps)
    trainable = lora.is_trained if opt_config.lora_rank else None

    def init_state(rng):
        params = nn.unbox(initializable(model).init(rng, jnp.ones((1, 1), jnp.int32))["params"])
        return fresh_state(params, tx, trainable)

    rng = jax.eval_shape(lambda: jax.random.key(0))
    abstract = jax.eval_shape(init_state, rng)
    param_specs = param_logical_axes(opt_config, model)
    sharding.check_divisible(abstract.params, param_specs, dict(mesh.shape), rules)
    state_specs = sharding.state_logical_specs(abstract, param_specs)
    state_sharding = sharding.logical_to_shardings(state_specs, mesh, rules)
    replicated = NamedSharding(mesh, P())
    ids = jax.ShapeDtypeStruct(
        (batch, seq_len), jnp.int32, sharding=sharding.batch_sharding(mesh, rules, 2)
    )
    example = {"input_ids": ids, "attention_mask": ids}
    step = jax.jit(
        lambda s, b, r: train_step(
            s, b, r, model=model, tx=tx, optim=experiment.optim, loss_fn=LanguageModelling.loss,
            trainable=trainable,
        ),
        in_shardings=(state_sharding, {k: v.sharding for k, v in example.items()}, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )  # fmt: skip
    state = _abstract(abstract, state_sharding)
    key = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated)
    with sharding.activate(mesh, rules):
        return [compile_program("train_step", step, state, example, key)], state


def abstract_params_on(opt_config: OPTConfig, mesh, rules):
    """The model's parameters, abstract, sharded on `mesh` by `rules` (the layers' kernels in
    host memory when opt_config.layer_memory says so, as param_tree.place_layers puts them)."""
    from opt_jax.model import abstract_params, param_logical_axes

    params_abstract = abstract_params(opt_config)
    specs = param_logical_axes(opt_config)
    sharding.check_divisible(params_abstract, specs, dict(mesh.shape), rules)
    params = _abstract(params_abstract, sharding.logical_to_shardings(specs, mesh, rules))
    if opt_config.layer_memory == "device":
        return params

    def hosted(path, x):  # as param_tree.place_layers stores them: one-byte codes as words
        if not is_layer_kernel(path):
            return x
        words = jax.eval_shape(as_words, jax.ShapeDtypeStruct(x.shape, x.dtype))
        memory = x.sharding.with_memory_kind(opt_config.layer_memory)
        return jax.ShapeDtypeStruct(words.shape, words.dtype, sharding=memory)

    return jax.tree_util.tree_map_with_path(hosted, params)


def abstract_cache_on(opt_config: OPTConfig, mesh, rules, batch: int, seq_len: int) -> KVCache:
    """A [B]-row, [S]-slot KV cache, abstract, with its rows over data x fsdp (one row:
    replicated) and its heads over tensor (scan_layers stacks every layer's cache into one
    [L, B, N, S, H] array)."""
    cache_abstract = jax.eval_shape(lambda: KVCache.init(opt_config, batch, seq_len))
    layers = (sharding.LAYERS,) if opt_config.scan_layers else ()
    rows = KV_AXES[:1] if batch > 1 else (None,)
    kv = sharding.logical_to_shardings(P(*layers, *rows, *KV_AXES[1:]), mesh, rules)
    if batch > 1:
        by_rows, by_rows2 = (sharding.batch_sharding(mesh, rules, n) for n in (1, 2))
    else:
        by_rows = by_rows2 = NamedSharding(mesh, P())
    cache_shardings = KVCache(
        key=jax.tree.map(lambda _: kv, cache_abstract.key),
        value=jax.tree.map(lambda _: kv, cache_abstract.value),
        slot_mask=by_rows2,
        index=by_rows,
        position=by_rows,
    )
    return _abstract(cache_abstract, cache_shardings)


def decode_programs(opt_config: OPTConfig, mesh, rules, batch: int, seq_len: int):
    """generate's two programs as they run on a mesh: the prefill of a [B, T/2] prompt into a
    T-slot cache, and one decode step (a token per row against the cache).

    Returns:
      ([Compiled prefill, Compiled decode step], the abstract params with shardings)
    """
    from opt_jax.generation.api import opt_tokens_to_logits

    params = abstract_params_on(opt_config, mesh, rules)
    cache = abstract_cache_on(opt_config, mesh, rules, batch, seq_len)
    rows = sharding.batch_sharding(mesh, rules, 2)

    def forward(params, tokens, mask, cache):
        logits, _, cache = opt_tokens_to_logits(opt_config, params)(tokens, mask, cache)
        return logits, cache

    step = jax.jit(forward, donate_argnums=(3,))
    prompt = jax.ShapeDtypeStruct((batch, max(seq_len // 2, 1)), jnp.int32, sharding=rows)
    prompt_mask = jax.ShapeDtypeStruct(prompt.shape, jnp.bool_, sharding=rows)
    token = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=rows)
    token_mask = jax.ShapeDtypeStruct((batch, 1), jnp.bool_, sharding=rows)
    with sharding.activate(mesh, rules):
        return [
            compile_program("prefill", step, params, prompt, prompt_mask, cache),
            compile_program("decode_step", step, params, token, token_mask, cache),
        ], params
