"""Speculative decoding against plain decoding and transformers' assisted generation, one run.

  python scripts/benchmark_speculative.py --target runs/small --draft demo_out \
      --output experiments/speculative/results.json --plot experiments/speculative/k.png

Batch 1, prompts of --prompt_len held-out tokens of the target's run (its data/eval.npy),
--new_tokens new tokens, EOS off. For each draft length K in --ks: greedy and sampled
(temperature 0.8) speculative decoding with the draft model, its acceptance (accepted drafts per
step / K) and tokens/s against our plain decoding of the target, and transformers' heuristic
draft length (starting at 5); prompt lookup (no draft) at each of --lookup_ks, on the same
prompts and on --grounded input-grounded prompts (--grounded_len tokens of held-out code,
chosen among 500 windows as those whose true continuation repeats the most of the prompt's
3-grams: code that reuses its prompt's identifiers) and on --copy copy-task prompts (a held-out
block of --grounded_len tokens followed by its first --copy_cue tokens again: the text calls for
the block once more, as in code editing); and transformers' assisted generation (PyTorch, the
same weights, greedy, num_assistant_tokens=K at the best K) against ours. Without --draft only
plain decoding and prompt lookup run. Each timing is the median of --reps rounds that run every
variant once (interleaved), after a warm-up call of each.
"""

import json
import os
import statistics
import tempfile
import time

from absl import app, flags

flags.DEFINE_string(
    "target", None, "Target model (a training workdir or checkpoint).", required=True
)
flags.DEFINE_string("draft", None, "Draft model, same tokenizer (none: prompt lookup only).")
flags.DEFINE_list("ks", ["1", "2", "3", "4", "6", "8", "12", "16"], "Draft lengths to try.")
flags.DEFINE_list("lookup_ks", ["2", "4", "8"], "Prompt lookup draft lengths.")
flags.DEFINE_integer("grounded", 4, "Input-grounded prompts for prompt lookup (0: none).")
flags.DEFINE_integer("grounded_len", 192, "Tokens of each input-grounded prompt.")
flags.DEFINE_integer("copy", 4, "Copy-task prompts for prompt lookup (0: none).")
flags.DEFINE_integer("copy_cue", 8, "Copy task: tokens of the block repeated after it.")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 64, "New tokens per call.")
flags.DEFINE_integer("prompts", 4, "Prompts (held-out windows).")
flags.DEFINE_integer("reps", 5, "Timed rounds (median).")
flags.DEFINE_bool("transformers", True, "Also time transformers' assisted generation.")
flags.DEFINE_string("output", None, "Write the results as JSON here.")
flags.DEFINE_string("plot", None, "Write acceptance and speed-up against K as a PNG here.")


def _load(path):
    import opt_jax
    from opt_jax.checkpoints import orbax_io

    directory = orbax_io.resolve_checkpoint(path)
    config, params = opt_jax.load_pretrained(directory, architecture="OPTForCausalLM")
    return directory, config, params


def grounded_prompts(held_out, count: int, length: int, new_tokens: int, candidates: int = 500):
    """The `count` held-out windows of `length` tokens (of `candidates` evenly spaced) whose
    next `new_tokens` true tokens repeat the most of the prompt's 3-grams: input-grounded text,
    where prompt lookup has something to find. Returns ([1, length] int32 prompts, the mean
    share of the continuation's 3-grams found in the prompt)."""
    import numpy as np

    if count == 0:
        return [], None
    span = length + new_tokens
    starts = np.linspace(0, len(held_out) - span - 1, candidates).astype(int)

    def share(s):
        window = held_out[s : s + span].tolist()
        seen = {tuple(window[i : i + 3]) for i in range(length - 2)}
        ahead = [tuple(window[i : i + 3]) for i in range(length, span - 2)]
        return sum(g in seen for g in ahead) / len(ahead)

    scores = np.array([share(s) for s in starts])
    best = np.argsort(-scores, kind="stable")[:count]
    prompts = [held_out[s : s + length][None].astype(np.int32) for s in starts[best]]
    return prompts, float(scores[best].mean())


def copy_prompts(held_out, count: int, length: int, cue: int):
    """The copy task of code editing: `count` evenly spaced held-out blocks of `length` tokens,
    each followed by its own first `cue` tokens again, so that the text calls for the block
    once more (the case prompt lookup is for: output that repeats its input). [1, length + cue]
    int32 prompts."""
    import numpy as np

    if count == 0:
        return []
    starts = np.linspace(0, len(held_out) - length - 1, count).astype(int)
    blocks = [held_out[s : s + length] for s in starts]
    return [np.concatenate([b, b[:cue]])[None].astype(np.int32) for b in blocks]


def forward_ms(config, params, positions: int, context: int = 96, reps: int = 30) -> float:
    """Median ms of one model call that feeds `positions` new tokens (batch 1) to a KV cache
    already holding `context` tokens and returns the logits of every new position: the cost of
    a draft step (1 position; 2 for an iteration's first call) or of a verify pass (Kc + 1)."""
    import jax
    import numpy as np

    from opt_jax.generation.api import lm_head_copy, opt_tokens_to_logits
    from opt_jax.kv_cache import KVCache

    context = min(context, config.max_position_embeddings - positions - 1)
    step = jax.jit(opt_tokens_to_logits(config, params, lm_head_copy(params), every_position=True))
    cache = KVCache.init(config, 1, context + positions + 1)
    _, _, cache = step(np.full((1, context), 5, np.int32), np.ones((1, context), bool), cache)
    tokens, mask = np.full((1, positions), 7, np.int32), np.ones((1, positions), bool)
    jax.block_until_ready(step(tokens, mask, cache))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(step(tokens, mask, cache))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv):
    del argv
    import numpy as np

    import opt_jax
    from opt_jax.planning import roofline

    f = flags.FLAGS
    target_dir, t_config, t_params = _load(f.target)
    target = opt_jax.OPTForCausalLM(t_config)
    draft_dir = None
    if f.draft:
        draft_dir, d_config, d_params = _load(f.draft)
        draft = opt_jax.OPTForCausalLM(d_config)
    held_out = np.load(os.path.join(f.target, "data", "eval.npy"))
    starts = np.linspace(0, len(held_out) - f.prompt_len - 1, f.prompts).astype(int)
    prompts = [held_out[s : s + f.prompt_len][None].astype(np.int32) for s in starts]
    grounded, overlap = grounded_prompts(held_out, f.grounded, f.grounded_len, f.new_tokens)
    # Prompt sets by variant-name prefix: the held-out windows, then the lookup tasks.
    sets = {"": prompts, "grounded ": grounded,
            "copy ": copy_prompts(held_out, f.copy, f.grounded_len, f.copy_cue)}  # fmt: skip
    base = dict(max_new_tokens=f.new_tokens, eos_token_id=[])
    sampled = dict(base, do_sample=True, temperature=0.8, top_k=None)
    variants = {"plain greedy": dict(base), "plain sampled": dict(sampled)}
    if f.draft:
        spec = dict(assistant_model=draft, assistant_params=d_params, output_acceptance=True)
        for k in map(int, f.ks):
            variants[f"greedy K={k}"] = dict(base, num_assistant_tokens=k, **spec)
            variants[f"sampled K={k}"] = dict(sampled, num_assistant_tokens=k, **spec)
        variants["greedy heuristic"] = dict(base, num_assistant_tokens=5, **spec,
                                            num_assistant_tokens_schedule="heuristic")  # fmt: skip
    for k in map(int, f.lookup_ks):
        variants[f"lookup K={k}"] = dict(base, prompt_lookup_num_tokens=k, output_acceptance=True)
    for prefix in ("grounded ", "copy "):
        if sets[prefix]:
            variants[f"{prefix}plain greedy"] = dict(base)
            for k in map(int, f.lookup_ks):
                variants[f"{prefix}lookup K={k}"] = variants[f"lookup K={k}"]

    def prefix_of(name):
        return next((p for p in ("grounded ", "copy ") if name.startswith(p)), "")

    def run(options, seed=0, name=""):
        chosen = sets[prefix_of(name)]
        return [opt_jax.generate(target, t_params, p, seed=seed, **options) for p in chosen]

    accepted = {}
    for name, options in variants.items():  # warm-up (compiles) and acceptance
        outs = run(options, name=name)
        if outs[0].acceptance is not None:
            steps = np.concatenate([o.acceptance[o.acceptance >= 0] for o in outs])
            accepted[name] = float(steps.mean())
    times = {name: [] for name in variants}
    for _ in range(f.reps):
        for name, options in variants.items():
            start = time.perf_counter()
            run(options, name=name)
            times[name].append(time.perf_counter() - start)
    tokens = f.new_tokens * len(prompts)
    rows = []
    for name in variants:
        seconds = statistics.median(times[name])
        peer = "plain sampled" if "sampled" in name else "plain greedy"
        prefix = prefix_of(name)
        plain = statistics.median(times[prefix + peer])
        made = f.new_tokens * len(sets[prefix])
        row = {"variant": name, "tokens_per_s": made / seconds, "speedup": plain / seconds,
               "accepted_per_step": accepted.get(name)}  # fmt: skip
        if name.split("K=")[-1].isdigit() and accepted.get(name) is not None:
            row["acceptance_rate"] = accepted[name] / int(name.split("K=")[-1])
        rows.append(row)
        print(f"[benchmark_speculative] {row}", flush=True)
    results = {"cpu": roofline.describe_cpu(), "target": target_dir, "draft": draft_dir,
               "prompt_len": f.prompt_len, "new_tokens": f.new_tokens,
               "grounded_len": f.grounded_len, "grounded_overlap": overlap,
               "copy_cue": f.copy_cue, "rows": rows}  # fmt: skip

    if f.transformers and f.draft:  # the same weights in PyTorch, transformers' assisted generation
        import torch
        import transformers

        greedy = [r for r in rows if r["variant"].startswith("greedy K=")]
        best = max(greedy, key=lambda r: r["speedup"])
        k = int(best["variant"].split("=")[1])
        with tempfile.TemporaryDirectory() as tmp:
            opt_jax.save_pretrained(os.path.join(tmp, "t"), t_config, t_params)
            opt_jax.save_pretrained(os.path.join(tmp, "d"), d_config, d_params)
            hf_t = transformers.OPTForCausalLM.from_pretrained(os.path.join(tmp, "t")).eval()
            hf_d = transformers.OPTForCausalLM.from_pretrained(os.path.join(tmp, "d")).eval()

        def hf_run():
            with torch.no_grad():
                for p in prompts:
                    mask = torch.ones(p.shape, dtype=torch.long)
                    hf_t.generate(torch.tensor(p), attention_mask=mask,
                                  assistant_model=hf_d, num_assistant_tokens=k,
                                  num_assistant_tokens_schedule="constant", do_sample=False,
                                  max_new_tokens=f.new_tokens, min_new_tokens=f.new_tokens,
                                  pad_token_id=1)  # fmt: skip

        hf_run()
        hf_times, ours_times = [], []
        for _ in range(f.reps):
            start = time.perf_counter()
            hf_run()
            hf_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            run(variants[best["variant"]])
            ours_times.append(time.perf_counter() - start)
        results["transformers_assisted"] = {
            "k": k, "hf_tokens_per_s": tokens / statistics.median(hf_times),
            "ours_tokens_per_s": tokens / statistics.median(ours_times),
            "ratio": statistics.median(hf_times) / statistics.median(ours_times),
        }  # fmt: skip
        print(f"[benchmark_speculative] {results['transformers_assisted']}", flush=True)
    # The cost model behind the speed-ups: an iteration with K drafts costs one 2-token draft
    # call, K - 1 one-token draft calls and one target pass over Kc + 1 positions, where Kc is
    # K rounded up to a multiple of 4 (generate's static draft capacity).
    results["forward_ms"] = {
        "target": {n: forward_ms(t_config, t_params, n) for n in (1, 2, 3, 5, 9, 13)},
    }
    if f.draft:
        results["forward_ms"]["draft"] = {n: forward_ms(d_config, d_params, n) for n in (1, 2)}
    print(f"[benchmark_speculative] forward ms {results['forward_ms']}", flush=True)
    if f.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for mode in ("greedy", "sampled", "grounded lookup", "copy lookup"):
            picked = [r for r in rows if r["variant"].startswith(f"{mode} K=")]
            if not picked:
                continue
            ks = [int(r["variant"].split("=")[1]) for r in picked]
            a.plot(ks, [r["acceptance_rate"] for r in picked], "o-", label=mode)
            b.plot(ks, [r["speedup"] for r in picked], "o-", label=mode)
        a.set(xlabel="draft tokens K", ylabel="accepted drafts / K", title="acceptance")
        b.axhline(1.0, color="gray", lw=0.5)
        b.set(xlabel="draft tokens K", ylabel="x plain decoding", title="speed-up")
        a.legend(), b.legend()
        fig.tight_layout()
        fig.savefig(f.plot, dpi=100)
    if f.output:
        with open(f.output, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    app.run(main)
