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
from opt_jax import checkpoint, distributed

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
    overrides = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
    if os.path.isdir(os.path.join(path, checkpoint.PARAMS_DIR)):
        return checkpoint.load_params(path, **overrides)
    return opt_jax.load_pretrained(path, **overrides)


distributed.define_flags()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    f = flags.FLAGS
    distributed.initialize_from_flags()  # before any other JAX call
    prompts = list(f.prompt)
    if f.prompt_file:
        with open(f.prompt_file) as file:
            prompts += [line.rstrip("\n") for line in file if line.strip()]
    if not prompts:
        raise app.UsageError("give --prompt and/or --prompt_file")
    config, params = _load(f.model, f.dtype)
    tokenizer = opt_jax.OPTTokenizer.from_pretrained(f.tokenizer or f.model)
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
        sys.stdout.write(prompt)
        if f.num_beams > 1:
            text = opt_jax.generate_text(model, params, tokenizer, [prompt], **options)[0]
            sys.stdout.write(text)
            generated += len(tokenizer.encode(text, add_prefix=False))
        else:
            tokens = []
            for piece in opt_jax.stream_text(
                model, params, tokenizer, prompt, tokens_out=tokens, **options
            ):
                sys.stdout.write(piece)
                sys.stdout.flush()
            generated += len(tokens)
        sys.stdout.write("\n\n")
    elapsed = time.time() - start
    print(
        f"[generate] {generated} tokens in {elapsed:.1f}s: {generated / elapsed:.1f} tokens/s "
        "(first call includes compilation)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    app.run(main)
