"""`minibt.serve`: the HTTP server's public face (needs the `serve` extra). `minibt.serve.app(model, tokenizer, ...)`
returns the ASGI app; `import minibt` never imports this module. The code lives in minibt/tools/: serve.py (the app),
serve_dialects.py (one adapter per client dialect) and serve_engine.py (the queue and the worker)."""
from .tools.serve import app

__all__ = ["app"]
