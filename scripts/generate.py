"""Generates text from an OPT checkpoint, streaming it to stdout.

  python scripts/generate.py --model opt-125m --prompt "Hello, my name is" --max_new_tokens 40
  python scripts/generate.py --model ckpt/ --tokenizer opt-125m --prompt_file prompts.txt \
      --do_sample --top_p 0.9 --seed 1

--model is an HF directory (config.json + weights) or an orbax checkpoint written by
scripts/convert.py or training (config.json + params/); --tokenizer defaults to --model.
"""

import os
import sys
import time

from absl import app, flags, logging

import opt_jax
from opt_jax.checkpoints import orbax_io as checkpoint
from opt_jax.parallel import distributed
from opt_jax.validation import validate_token_ids

flags.DEFINE_string("model", None, "HF directory or orbax checkpoint directory.", required=True)
flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: --model).")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompt_file", None, "A file with one prompt per line.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Compute and param dtype.")
flags.DEFINE_bool("do_sample", False, "Sample instead of greedy decoding.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_integer("top_k", 50, "Top-k filter (0 disables) / contrastive candidates.")
flags.DEFINE_float("top_p", 1.0, "Nucleus filter.")
flags.DEFINE_float("min_p", None, "Min-p filter.")
flags.DEFINE_float("typical_p", 1.0, "Typical-p filter.")
flags.DEFINE_float("repetition_penalty", 1.0, "CTRL repetition penalty.")
flags.DEFINE_integer("no_repeat_ngram_size", 0, "Ban repeated n-grams of this size.")
flags.DEFINE_integer("num_beams", 1, "Beam search width (no streaming when > 1).")
flags.DEFINE_float("penalty_alpha", None, "Contrastive search degeneration penalty.")
flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def _load(path, dtype):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path} is not a directory")
    overrides = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
    if os.path.isdir(os.path.join(path, checkpoint.PARAMS_DIR)):
        return checkpoint.load_params(path, **overrides)
    return opt_jax.load_pretrained(path, **overrides)


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


def _check_flags(f) -> None:
    """What needs no model: checked before anything is loaded."""
    if f.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {f.max_new_tokens}")
    if f.num_beams < 1:
        raise ValueError(f"--num_beams must be >= 1, got {f.num_beams}")
    if any(not s for s in f.stop):
        raise ValueError("--stop must be a non-empty string")


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


def _generate_beams(model, params, tokenizer, prompt, options) -> tuple[str, int]:
    """generate_text for one prompt with beam search, plus how many tokens it generated."""
    generated: list[list[int]] = []
    [text] = opt_jax.generate_text(
        model, params, tokenizer, [prompt], tokens_out=generated, **options
    )
    return text, len(generated[0])


def _run(f) -> None:
    _check_flags(f)
    prompts = _read_prompts(f)
    distributed.initialize_from_flags()  # before any other JAX call
    config, params = _load(f.model, f.dtype)
    tokenizer = _load_tokenizer(f.tokenizer or f.model, f.model)
    _check_prompts(prompts, tokenizer, config, f.max_new_tokens)
    model = opt_jax.OPTForCausalLM(config)
    options = dict(
        max_new_tokens=f.max_new_tokens, do_sample=f.do_sample, temperature=f.temperature,
        top_k=f.top_k or None, top_p=f.top_p, min_p=f.min_p, typical_p=f.typical_p,
        repetition_penalty=f.repetition_penalty, no_repeat_ngram_size=f.no_repeat_ngram_size,
        num_beams=f.num_beams, penalty_alpha=f.penalty_alpha, stop_strings=f.stop or None,
        seed=f.seed,
    )  # fmt: skip
    generated, start = 0, time.time()
    for prompt in prompts:
        # The prompt is echoed only once its generation has produced something (or finished):
        # an option error raised by the first call leaves stdout empty.
        if f.num_beams > 1:
            text, count = _generate_beams(model, params, tokenizer, prompt, options)
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
