"""An OpenAI-compatible HTTP server over one `Engine` (`mistral4-jax serve`; README "Serving").

- `protocol.py`: request schemas, the error body and statuses, token strings;
- `api.py`: the FastAPI app (chat completions, completions, models, health);
- `worker.py`: the engine thread, and how the other processes of a multi-host server follow process 0;
- `multihost.py`: process 0's messages to the others, through JAX's coordination service;
- `server.py`: uvicorn on a thread, the drain on SIGINT / SIGTERM.

Needs the `serve` extra (fastapi, uvicorn): `pip install -e ".[serve]"`. `import mistral4_jax` never
imports this package.
"""

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:  # the optional extra is missing
    raise ImportError(f"mistral4_jax.serve needs fastapi and uvicorn: pip install -e \".[serve]\" ({e})") from None
