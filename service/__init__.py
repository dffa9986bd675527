"""The HTTP service: FastAPI app, async micro-batching, factor endpoints, Prometheus metrics.

`sgz serve` runs it; `create_app(Settings(...))` builds it for embedding or tests.
"""

from .app import create_app
from .settings import Settings

__all__ = ["create_app", "Settings"]
