"""Generates text from an OPT checkpoint, streaming it to stdout.

  python scripts/generate.py --model opt-125m --prompt "Hello, my name is" --max_new_tokens 40
  python scripts/generate.py --model ckpt/ --tokenizer opt-125m --prompt_file prompts.txt \
      --do_sample --top_p 0.9 --seed 1
  python scripts/generate.py --model opt-1.3b --assistant opt-125m --num_assistant_tokens 5 \
      --prompt "def fibonacci(n):"     # speculative decoding (or --prompt_lookup_num_tokens 5)
  python scripts/generate.py --model opt-13b --offload disk --memory_limit 8GB \
      --dtype float32 --prompt "Hello"  # a model larger than memory, read layer by layer

--model is an HF directory (config.json + weights) or an orbax checkpoint written by
scripts/convert.py or training (config.json + params/); --tokenizer defaults to --model.
"""

import os
import sys
import time

from absl import app, flags, logging

import opt_jax
from opt_jax.generation.config import flag_specs
from opt_jax.parallel import distributed
from opt_jax.validation import validate_token_ids

flags.DEFINE_string("model", None, "HF directory or orbax checkpoint directory.", required=True)
flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: --model).")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompt_file", None, "A file with one prompt per line.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Compute and param dtype.")
flags.DEFINE_enum("quantize", None, ["int8", "int4", "llm_int8"], "Quantise weights as they load.")
flags.DEFINE_enum(
    "offload",
    None,
    ["disk", "host"],
    "disk: keep the decoder layers on disk and stream them (needs --memory_limit); host "
    "(accelerators): the layers' kernels in host memory, moved to the chip per layer.",
)
flags.DEFINE_string("memory_limit", None, "With --offload: memory the model may use, e.g. 8GB.")
flags.DEFINE_string(
    "offload_folder", None, "With --offload disk: where a KV cache too large for the limit goes."
)
flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
flags.DEFINE_string(
    "assistant", None, "A smaller OPT (same tokenizer) drafting tokens: speculative decoding."
)
flags.DEFINE_integer("seed", 0, "Sampling seed.")

# One flag per GenerationConfig option, derived from its field (name, default, help).
SCRIPT_DEFAULTS = {"max_new_tokens": 64}
_DEFINE = {
    "bool": flags.DEFINE_bool,
    "int": flags.DEFINE_integer,
    "int?": flags.DEFINE_integer,
    "count?": flags.DEFINE_integer,
    "float": flags.DEFINE_float,
    "float?": flags.DEFINE_float,
}
for _spec in flag_specs():
    _name, _kind, _help = _spec["name"], _spec["kind"], _spec["help"]
    if _kind == "early_stopping":
        flags.DEFINE_enum(_name, str(_spec["default"]), ["True", "False", "never"], _help)
    elif _kind == "schedule":
        flags.DEFINE_enum(_name, _spec["default"], ["constant", "heuristic"], _help)
    elif _kind.startswith("ids"):
        flags.DEFINE_multi_integer(_name, None, _help)
    else:
        _DEFINE[_kind](_name, SCRIPT_DEFAULTS.get(_name, _spec["default"]), _help)


def _generation_options(f) -> dict:
    """The GenerationConfig options given on the command line (unset ones keep their default)."""
    options = {}
    for spec in flag_specs():
        value = f[spec["name"]].value
        if spec["kind"] == "early_stopping":
            value = {"True": True, "False": False}.get(value, value)
        if value is not None:
            options[spec["name"]] = value
    return options


def _load(path, dtype, quantize, offload=None, memory_limit=None, offload_folder=None):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path} is not a directory")
    overrides = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
    if offload == "host":  # stacked kernels in host memory, quantised or not
        if memory_limit:
            raise ValueError("--memory_limit is for --offload disk")
        return opt_jax.load_pretrained(path, offload="host", quantize=quantize, **overrides)
    if offload or memory_limit:  # layers stay on disk; the cast to dtype happens per layer
        if not (offload and memory_limit):
            raise ValueError("--offload disk and --memory_limit go together")
        if quantize:
            raise ValueError("--offload does not combine with --quantize")
        return opt_jax.load_pretrained(
            path, offload=offload, memory_limit=memory_limit, offload_folder=offload_folder,
            dtype=dtype, param_dtype=dtype,
        )  # fmt: skip
    if quantize:  # layer by layer: only one layer's weights are ever dequantised at a time
        overrides["scan_layers"] = True
    # An HF directory or an orbax checkpoint (ours); quantised as it loads when asked.
    return opt_jax.load_pretrained(path, quantize=quantize, **overrides)


def _load_tokenizer(path, model_path):
    try:
        return opt_jax.OPTTokenizer.from_pretrained(path)
    except FileNotFoundError as e:
        if path == model_path:
            raise FileNotFoundError(
                f"{e}; pass --tokenizer DIR (e.g. the HF directory the checkpoint came from)"
            ) from e
        raise FileNotFoundError(f"--tokenizer: {e}") from e


def _read_prompts(f) -> list[str]:
    prompts = list(f.prompt)
    if f.prompt_file:
        if not os.path.isfile(f.prompt_file):
            raise FileNotFoundError(f"--prompt_file {f.prompt_file} does not exist")
        with open(f.prompt_file) as file:
            prompts += [line.rstrip("\n") for line in file if line.strip()]
    if not prompts:
        raise ValueError("give --prompt and/or --prompt_file")
    return prompts


def _check_flags(f) -> opt_jax.GenerationConfig:
    """What needs no model, checked before anything is loaded: the generation options."""
    if any(not s for s in f.stop):
        raise ValueError("--stop must be a non-empty string")
    try:
        return opt_jax.GenerationConfig(**_generation_options(f))
    except ValueError as e:
        raise ValueError(f"--{e}") from e


def _check_prompts(prompts, tokenizer, config, max_new_tokens) -> None:
    """Encodes every prompt and checks it fits the model before anything is generated.

    Raises:
      ValueError: one `prompt N: <reason>` line per bad prompt (N counts from 1, --prompt flags
        first, then the lines of --prompt_file).
    """
    limit, problems = config.max_position_embeddings, []
    for i, prompt in enumerate(prompts, 1):
        ids = tokenizer.encode(prompt)
        try:
            validate_token_ids([ids], config.vocab_size, name="the encoded prompt")
        except ValueError as e:
            problems.append(f"prompt {i}: {e} (does --tokenizer match the model?)")
            continue
        if len(ids) + max_new_tokens > limit:
            problems.append(
                f"prompt {i}: {len(ids)} tokens + --max_new_tokens {max_new_tokens} = "
                f"{len(ids) + max_new_tokens} exceeds the model's {limit} positions "
                f"(prompt starts {prompt[:40]!r})"
            )
    if problems:
        raise ValueError("\n".join(problems))


def _generate_whole(model, params, tokenizer, prompt, options) -> tuple[str, int]:
    """generate_text for one prompt (beam search, or several continuations, which do not stream),
    plus how many tokens it generated. Several continuations are printed one after another."""
    generated: list[list[int]] = []
    texts = opt_jax.generate_text(
        model, params, tokenizer, [prompt], tokens_out=generated, **options
    )
    return f"\n---\n{prompt}".join(texts), sum(len(g) for g in generated)


def _run(f) -> None:
    cfg = _check_flags(f)
    prompts = _read_prompts(f)
    distributed.initialize_from_flags()  # before any other JAX call
    config, params = _load(
        f.model, f.dtype, f.quantize, f.offload, f.memory_limit, f.offload_folder
    )
    tokenizer = _load_tokenizer(f.tokenizer or f.model, f.model)
    _check_prompts(prompts, tokenizer, config, cfg.max_new_tokens)
    model = opt_jax.OPTForCausalLM(config)
    options = dict(
        generation_config=cfg,
        max_new_tokens=cfg.max_new_tokens,
        stop_strings=f.stop or None,
        seed=f.seed,
    )
    if f.assistant:  # speculative decoding: the assistant drafts, this model verifies
        draft_config, draft_params = _load(f.assistant, f.dtype, f.quantize)
        options.update(
            assistant_model=opt_jax.OPTForCausalLM(draft_config), assistant_params=draft_params
        )
    generated, start = 0, time.time()
    for prompt in prompts:
        # The prompt is echoed only once its generation has produced something (or finished):
        # an option error raised by the first call leaves stdout empty.
        if cfg.is_beam or cfg.num_return_sequences > 1:  # these do not stream
            text, count = _generate_whole(model, params, tokenizer, prompt, options)
            sys.stdout.write(prompt + text)
            generated += count
        else:
            tokens, echoed = [], False
            for piece in opt_jax.stream_text(
                model, params, tokenizer, prompt, tokens_out=tokens, **options
            ):
                if not echoed:
                    sys.stdout.write(prompt)
                    echoed = True
                sys.stdout.write(piece)
                sys.stdout.flush()
            if not echoed:
                sys.stdout.write(prompt)
            generated += len(tokens)
        sys.stdout.write("\n\n")
        sys.stdout.flush()
    elapsed = time.time() - start
    print(
        f"[generate] {generated} tokens in {elapsed:.1f}s: {generated / elapsed:.1f} tokens/s "
        "(first call includes compilation)",
        file=sys.stderr,
    )


distributed.define_flags()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    try:
        _run(flags.FLAGS)
    except (ValueError, FileNotFoundError, app.UsageError) as e:  # CheckpointError: a ValueError
        sys.stdout.flush()
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
