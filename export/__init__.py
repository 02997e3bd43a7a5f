"""ONNX export of the adapter, KV-encoder and denoiser (installed as ``lcmla_sdk.export``; not implemented yet)."""
