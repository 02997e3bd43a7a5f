"""TensorRT engine runtime (installed as ``lcmla_sdk.engines``; not implemented yet).

Build artefacts written by ``lcmla export`` go to sub-folders here and are git-ignored.
"""
