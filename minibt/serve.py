"""`minibt.serve`: the HTTP server's public face (needs the `serve` extra). `minibt.serve.app(model, tokenizer, ...)`
returns the ASGI app; `import minibt` never imports this module. The code lives in minibt/tools/serve.py."""
from .tools.serve import app

__all__ = ["app"]
