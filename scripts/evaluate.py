"""Evaluates an OPT checkpoint: perplexity of text files and lm-evaluation-harness tasks.

  python scripts/evaluate.py --model opt-125m --perplexity wiki.txt --max_length 1024 \
      --stride 512 --output out.json
  python scripts/evaluate.py --model opt-125m --tasks hellaswag,lambada_openai --batch_size 8
  python scripts/evaluate.py --model runs/tiny --tasks opt_jax_mc \
      --include_path tests/eval_tasks --benchmark     # ours vs lm-eval's hf backend, timed

--model is an HF directory, one of our exports, or a training workdir (its export/, else its
latest checkpoint). Perplexity follows transformers' "Perplexity of fixed-length models"
recipe: the file is encoded once with OPT's `</s>` prefix, windows of --max_length tokens
advance by --stride, and each scores only tokens no earlier window scored (every token after
the prefix exactly once). Tasks need `pip install -e ".[eval]"`; everything runs offline on
local data (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set unless you set them).
"""

import json
import math
import os
import sys
import time

from absl import app, flags, logging

flags.DEFINE_string(
    "model", None, "HF directory, our export, or a training workdir.", required=True
)
flags.DEFINE_multi_string("perplexity", [], "Text file(s) whose perplexity to compute.")
flags.DEFINE_integer("max_length", None, "Window length (default: the model's context).")
flags.DEFINE_integer("stride", None, "Window stride for perplexity (default: max_length / 2).")
flags.DEFINE_list("tasks", [], "lm-eval tasks, comma-separated.")
flags.DEFINE_string("include_path", None, "A directory of extra lm-eval task YAML files.")
flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per task (default: the task's).")
flags.DEFINE_integer("limit", None, "At most this many documents per task.")
flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Compute and param dtype.")
flags.DEFINE_enum("quantize", None, ["int8", "int4", "llm_int8"], "Quantise weights as they load.")
flags.DEFINE_bool("benchmark", False, "Time --tasks with our backend and lm-eval's hf backend.")
flags.DEFINE_string("output", None, "Write the results as JSON here.")


def resolve_model(path: str) -> str:
    from opt_jax.checkpoints import orbax_io

    return orbax_io.resolve_checkpoint(path)


def perplexities(model_dir, files, max_length, stride, batch_size, dtype, quantize=None) -> dict:
    import opt_jax
    from opt_jax.evaluation import perplexity

    overrides = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
    if quantize:  # one layer's kernels dequantised at a time (see scripts/generate.py)
        overrides["scan_layers"] = True
    config, params = opt_jax.load_pretrained(
        model_dir, architecture="OPTForCausalLM", quantize=quantize, **overrides
    )
    tokenizer = opt_jax.OPTTokenizer.from_pretrained(model_dir)
    model = opt_jax.OPTForCausalLM(config)
    max_length = max_length or config.max_position_embeddings
    stride = stride or max(max_length // 2, 1)
    results, total_nll, total_tokens = {}, 0.0, 0
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--perplexity {path} does not exist")
        with open(path, encoding="utf-8") as f:
            tokens = tokenizer.encode(f.read())
        start = time.time()
        result = perplexity(
            model, params, tokens, max_length=max_length, stride=stride, batch_size=batch_size
        )
        result.update(max_length=max_length, stride=stride, seconds=time.time() - start)
        results[path] = result
        total_nll, total_tokens = (
            total_nll + result["nll"] * result["tokens"],
            total_tokens + result["tokens"],
        )
        print(
            f"[evaluate] {path}: perplexity {result['perplexity']:.4f} "
            f"over {result['tokens']} tokens",
            file=sys.stderr,
        )
    return {"perplexity": math.exp(total_nll / total_tokens), "files": results}


def run_tasks(model_dir, f, backend: str = "opt_jax", task_manager=None) -> dict:
    """lm-eval on --tasks with `backend`; "seconds" times the evaluation itself (backend
    construction, requests, metrics), not the indexing of the task files (`task_manager`)."""
    from opt_jax import eval_harness

    task_manager = task_manager or eval_harness.task_manager_for(f.tasks, f.include_path)
    args = {"batch_size": f.batch_size, "dtype": f.dtype, "max_length": f.max_length}
    if backend == "opt_jax":
        args["quantize"] = f.quantize
    if backend == "hf":  # transformers (PyTorch) on the CPU unless CUDA is there
        import torch

        args["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        args["dtype"] = f.dtype or "float32"
    start = time.time()
    out = eval_harness.evaluate(
        model_dir, f.tasks, include_path=f.include_path, model=backend, model_args=args,
        num_fewshot=f.num_fewshot, limit=f.limit, task_manager=task_manager,
    )  # fmt: skip
    return {"results": out["results"], "seconds": time.time() - start}


def table(results: dict) -> str:
    rows = ["| what | metric | value |", "|---|---|---|"]
    for path, r in results.get("perplexity", {}).get("files", {}).items():
        rows.append(f"| {path} | perplexity | {r['perplexity']:.4f} |")
    for task, metrics in results.get("tasks", {}).get("results", {}).items():
        for name, value in metrics.items():
            if isinstance(value, float) and "stderr" not in name:
                rows.append(f"| {task} | {name} | {value:.4f} |")
    return "\n".join(rows)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    f = flags.FLAGS
    try:
        if not f.perplexity and not f.tasks:
            raise ValueError("give --perplexity FILE and/or --tasks T1,T2")
        if f.benchmark and not f.tasks:
            raise ValueError("--benchmark times --tasks: give some")
        model_dir = resolve_model(f.model)
        results = {"model": model_dir}
        if f.perplexity:
            results["perplexity"] = perplexities(
                model_dir, f.perplexity, f.max_length, f.stride, f.batch_size, f.dtype, f.quantize
            )
        if f.tasks:
            from opt_jax import eval_harness

            manager = eval_harness.task_manager_for(f.tasks, f.include_path)
            if f.benchmark:  # imports and first-touch costs shared by both, paid up front
                import torch  # noqa: F401  (lm-eval seeds torch whichever backend runs)
            results["tasks"] = run_tasks(model_dir, f, task_manager=manager)
        if f.benchmark:
            hf = run_tasks(model_dir, f, backend="hf", task_manager=manager)
            ours = results["tasks"]["seconds"]
            from opt_jax.eval_harness import TIMINGS
            from opt_jax.planning import roofline

            results["benchmark"] = {
                "opt_jax_s": ours,
                "opt_jax_first_result_s": TIMINGS.get("first_result_s"),
                "hf_s": hf["seconds"],
                "speedup": hf["seconds"] / ours,
                "cpu": roofline.describe_cpu(),
            }
            print(
                f"[evaluate] opt_jax {ours:.1f} s, lm-eval hf {hf['seconds']:.1f} s: "
                f"{hf['seconds'] / ours:.2f}x",
                file=sys.stderr,
            )
    except (ValueError, FileNotFoundError) as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    print(table(results))
    if "perplexity" in results:
        results["perplexity"], results["perplexity_files"] = (
            results["perplexity"]["perplexity"],
            results["perplexity"]["files"],
        )
    if f.output:
        with open(f.output, "w") as out:
            json.dump(results, out, indent=2, default=str)


if __name__ == "__main__":
    app.run(main)
