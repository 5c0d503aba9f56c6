"""Serving OPT over HTTP: the continuous-batching engine (engine.py) and an OpenAI-compatible
completions API on FastAPI (server.py; scripts/serve.py starts it)."""
