"""Orbax checkpoints.

- Parameters for inference (`save_params` / `load_params`): `DIR/config.json` + `DIR/params/`,
  written by scripts/convert.py and by training's export.
- Training state (`TrainCheckpoints`): an orbax CheckpointManager over
  `WORKDIR/checkpoints/<step>/{state, meta}`, used by the training loop to save and resume.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from opt_jax.config import OPTConfig
from opt_jax.model import abstract_params
from opt_jax.parallel.sharding import sync

PARAMS_DIR = "params"


def save_params(directory: str | os.PathLike, config: OPTConfig, params) -> None:
    """Writes the params (orbax) and their config.json. Orbax commits atomically: an
    interrupted save leaves no `params/` directory that looks complete."""
    directory = os.path.abspath(os.fspath(directory))  # orbax requires absolute paths
    target = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(target):
        raise FileExistsError(f"{target} already exists; refusing to overwrite a checkpoint")
    sync("save-params-checked")  # every process checked before any starts writing
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target, nn.unbox(params))  # boxed, as flax's model.init returns them
    if jax.process_index() == 0:
        config.save_hf(directory)


def load_params(
    directory: str | os.PathLike, shardings=None, **config_overrides
) -> tuple[OPTConfig, dict]:
    """Reads a checkpoint written by `save_params` (or the params-only export of training).

    Args:
      shardings: a tree of target shardings (e.g. from `sharding.logical_to_shardings`), so
        each device reads only its shard; default: everything on the first local device,
        whatever mesh wrote the checkpoint.

    The parameter tree is checked against the config: a checkpoint of a different model is an
    error naming the mismatching parameters, not a silent reshape.
    """
    directory = os.path.abspath(os.fspath(directory))
    config = OPTConfig.from_hf(directory, **config_overrides)
    target = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(target):
        raise FileNotFoundError(f"no orbax params checkpoint at {target}")
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(target).item_metadata.tree
        if "scan_layers" not in config_overrides:
            # The layout is in the tree itself: stacked `layers` means a scan_layers model.
            decoder = stored.get("decoder") or stored.get("model", {}).get("decoder", {})
            config = config.replace(scan_layers="layers" in decoder)
        expected = abstract_params(config)
        flat_stored = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
        flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
        shape = lambda k: tuple(flat_stored[k].shape) if k in flat_stored else "nothing"  # noqa: E731
        problems = [
            f"{jax.tree_util.keystr(k)}: stored {shape(k)}, config expects {tuple(v.shape)}"
            for k, v in flat_expected.items()
            if shape(k) != tuple(v.shape)
        ]
        problems += [
            f"{jax.tree_util.keystr(k)}: not in the config"
            for k in flat_stored
            if k not in flat_expected
        ]
        if problems:
            raise ValueError(
                f"checkpoint {target} does not match its config: " + "; ".join(problems)
            )
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: device, expected)
        expected = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), expected, shardings
        )
        params = checkpointer.restore(target, expected)
    return config, params


# ---------------------------------------------------------------------------------------------
# Training checkpoints: WORKDIR/checkpoints/<step>/{state, meta}
# ---------------------------------------------------------------------------------------------
class TrainCheckpoints:
    """Orbax CheckpointManager for training state plus JSON metadata (the model config).

    Saves are asynchronous and committed atomically: a save interrupted by kill -9 leaves only a
    temporary directory that `latest_step()` ignores, so resume falls back to the last complete
    step. Only the newest `keep` checkpoints are kept.
    """

    def __init__(self, workdir: str, keep: int, save_every: int | None = None):
        directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, create=True
        )
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Restores into the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["meta"]

    def read_meta(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def export_latest(workdir: str | os.PathLike) -> str:
    """Writes the parameters of a training workdir's latest checkpoint as an inference export
    (config.json + params/ + the run's tokenizer) at WORKDIR/export_step_N, once, and returns
    that directory: what evaluation and generation load when a run has no export/ yet."""
    import shutil

    workdir = os.path.abspath(os.fspath(workdir))
    ckpts = TrainCheckpoints(workdir, keep=1_000_000)  # never deletes: nothing is saved here
    try:
        step = ckpts.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir} holds no complete training checkpoint")
        target = os.path.join(workdir, f"export_step_{step}")
        if os.path.isfile(os.path.join(target, "config.json")):
            return target
        config = OPTConfig.from_hf(ckpts.read_meta(step)["model"])
        args = ocp.args.Composite(state=ocp.args.StandardRestore())
        params = ckpts.manager.restore(step, args=args)["state"]["params"]
    finally:
        ckpts.close()
    staging = target + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    save_params(staging, config, params)
    tokenizer = os.path.join(workdir, "data", "tokenizer")
    if os.path.isdir(tokenizer):
        for name in os.listdir(tokenizer):
            shutil.copy(os.path.join(tokenizer, name), staging)
    os.replace(staging, target)  # a crash never leaves a half-written export behind
    return target


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """The checkpoint directory `path` names: itself (config.json there), a training workdir's
    export/, or (exported on first use) a workdir's latest checkpoint."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if os.path.isfile(os.path.join(path, "export", "config.json")):
        return os.path.join(path, "export")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return export_latest(path)
    raise FileNotFoundError(
        f"--model {path}: no config.json there, nor a training workdir's export/ or checkpoints/"
    )
