"""Tooling built on the core (the `minibt` command, bench, audit, attention maps, embed --file, serve, ray).

The core (models, attention, kernels, loading, embed, generate) never imports this package; optional extras
(matplotlib, the server stack, ray) are imported only here, and only when their command runs.
"""
