"""TensorRT and TensorRT-RTX engines and the graph-backed runtime (installed as ``lcmla_sdk.engines``).

Build artefacts written by ``lcmla export`` go to sub-folders of the repository's ``engines/`` folder and are
git-ignored; only this package's code is tracked there.
"""

from .backends import BACKENDS, EngineBackend, EngineMismatchError, TensorRT, TensorRTRTX, TensorRTUnavailable
from .building import build_engines
from .engine import BuildOptions

__all__ = ["BACKENDS", "BuildOptions", "EngineBackend", "EngineMismatchError", "TensorRT", "TensorRTRTX",
           "TensorRTUnavailable", "build_engines"]  # fmt: skip
