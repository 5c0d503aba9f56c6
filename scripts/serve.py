"""Serves an OPT checkpoint over HTTP with an OpenAI-compatible completions API.

  pip install -e ".[serve]"
  python scripts/serve.py --model demo_out/export --port 8000 --max_batch 8
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"prompt": "def fib(n):", "max_tokens": 32, "temperature": 0}'

--model is an HF directory or one of our exports (with a tokenizer). Requests are batched
continuously (opt_jax/serving/engine.py): up to --max_batch sequences decode together, each of
at most --max_length prompt + completion tokens; --max_queue more wait (then 429). /health
answers once the model is loaded and compiled. SIGTERM finishes the requests in flight, then
exits.
"""

import os
import sys

from absl import app, flags

flags.DEFINE_string("model", None, "HF directory or our export, with a tokenizer.", required=True)
flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
flags.DEFINE_integer("port", 8000, "Port.")
flags.DEFINE_integer("max_batch", 8, "Sequences decoded together (KV-cache slots).")
flags.DEFINE_integer("max_length", 1024, "Prompt + completion tokens per sequence.")
flags.DEFINE_integer("max_queue", 64, "Requests waiting for a slot before 429.")
flags.DEFINE_enum("quantize", None, ["int8", "int4", "llm_int8"], "Quantise the weights.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Compute and param dtype.")
flags.DEFINE_string("served_model_name", None, "The model name in the API (default: --model).")


def main(argv):
    del argv
    try:
        import uvicorn

        from opt_jax.serving.server import create_app
    except ModuleNotFoundError as e:
        print(f"error: {e.name} is missing: pip install -e '.[serve]'", file=sys.stderr)
        sys.exit(2)
    import opt_jax
    from opt_jax.serving.engine import Engine

    f = flags.FLAGS
    overrides = {"dtype": f.dtype, "param_dtype": f.dtype} if f.dtype else {}
    if f.quantize:  # layer by layer: only one layer's weights are ever dequantised at a time
        overrides["scan_layers"] = True
    try:
        config, params = opt_jax.load_pretrained(
            f.model, architecture="OPTForCausalLM", quantize=f.quantize, **overrides
        )
        tokenizer = opt_jax.OPTTokenizer.from_pretrained(f.model)
        engine = Engine(config, params, max_batch=f.max_batch,
                        max_length=min(f.max_length, config.max_position_embeddings),
                        max_queue=f.max_queue)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    engine.warm_up()  # compile before /health says yes
    engine.start()
    name = f.served_model_name or os.path.basename(os.path.normpath(f.model))
    application = create_app(engine, tokenizer, name)
    print(f"[serve] {name} on http://{f.host}:{f.port} (max_batch {f.max_batch})", flush=True)
    try:
        uvicorn.run(application, host=f.host, port=f.port, log_level="warning",
                    timeout_graceful_shutdown=60)  # fmt: skip
    finally:
        engine.stop()


if __name__ == "__main__":
    app.run(main)
