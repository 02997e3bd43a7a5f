"""``lcmla serve``: the SDK as an HTTP service on Ray Serve (the ``serve`` extra).

``settings`` (what an operator chooses), ``store`` (identity files by content hash), ``messages`` (what the ingress
and the replicas pass each other), ``model`` (the model deployment and its batching), ``routing`` (identity
affinity), ``api`` (the FastAPI ingress), ``launch`` (start, stop, the config builder). docs/SERVING.md describes the
API and the set-ups.
"""

from .settings import ServeSettings, Shape

__all__ = ["ServeSettings", "Shape"]
