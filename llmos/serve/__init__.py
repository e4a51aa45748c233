"""llmos on Ray Serve (`pip install llmos[ray]`): replicas that each supervise one llmosd.

ServeConfig (llmos.serve.config) and the batch split/merge (llmos.serve.batches) import
without Ray; build_app (llmos.serve.app) needs it. See docs/scale-out.md."""
from llmos.serve.config import ServeConfig


def build_app(config: ServeConfig):
    from llmos.serve.app import build_app as build   # imports Ray
    return build(config)


__all__ = ["ServeConfig", "build_app"]
