"""Probe: what cuDNN's choices and fused projections give the sampling step's networks and the decode (issue 19).

Each tried on the same loaded model in one process, every network alone in a CUDA graph at batch 1, 1024^2 (the
shapes of ``compile_probe.py``):

* ``cudnn_benchmark``: cuDNN times its convolution algorithms on first use of a shape instead of picking one by
  heuristics (``torch.backends.cudnn.benchmark``);
* ``cudnn_attention``: scaled-dot-product attention by cuDNN's kernel instead of FlashAttention-2 (only cuDNN's is
  allowed, so a shape it refuses raises instead of falling back unseen);
* ``fused_projections`` (eager): each self-attention's Q, K and V (in the K/V-encoder also the K/V it hands the
  denoiser) from one GEMM over the concatenated weights instead of three (five), as diffusers'
  ``fuse_qkv_projections`` does; a probe-only stand-in here (``--fused-only`` runs just these rows).

Also where the eager denoiser's GPU time goes (profiler kernel names grouped). Prints a table, writes JSON.

    python benchmarks/kernel_probe.py --out $OUT/kernel_probe.json      # on the GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from compile_probe import DEVICE, PRESET, network_call
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lcmla_sdk import Personalizer
from lcmla_sdk.attention import AppendedKVAttnProcessor
from lcmla_sdk.bench_timing import graph_ms

KERNEL_GROUPS = (("attention", ("flash", "fmha", "attention", "sdpa")), ("gemm", ("gemm", "xmma", "cutlass", "cublas")),
                 ("convolution", ("conv", "implicit", "winograd", "dgrad", "fprop")))  # fmt: skip


@contextlib.contextmanager
def choices(benchmark: bool, cudnn_attention: bool):
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if cudnn_attention else contextlib.nullcontext():
            yield
    finally:
        torch.backends.cudnn.benchmark = before


class _SharedProjection(nn.Module):
    """Several bias-free projections of one input as one GEMM: the first slot called with a new input computes them
    all, the others return their slice of it (the processor calls them one after another on the same tensor)."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
        self.sizes = [layer.weight.shape[0] for layer in layers]
        self.last: tuple = (None, ())

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self.last[0] is not x:
            self.last = (x, F.linear(x, self.weight).split(self.sizes, dim=-1))
        return self.last[1][index]


class _Slot(nn.Module):
    def __init__(self, shared: _SharedProjection, index: int) -> None:
        super().__init__()
        self.shared, self.index = shared, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(x, self.index)


@contextlib.contextmanager
def fused_projections(module: nn.Module, with_handed_kv: bool):
    """Every self-attention of ``module`` with its projections fused (restored after)."""
    swapped = []
    for attn in module.modules():
        if isinstance(attn, Attention) and isinstance(attn.processor, AppendedKVAttnProcessor):
            owners = [(attn, "to_q"), (attn, "to_k"), (attn, "to_v")]
            owners += [(attn.processor, "to_k_kv"), (attn.processor, "to_v_kv")] if with_handed_kv else []
            shared = _SharedProjection([getattr(owner, name) for owner, name in owners])
            for index, (owner, name) in enumerate(owners):
                swapped.append((owner, name, getattr(owner, name)))
                setattr(owner, name, _Slot(shared, index))
    try:
        yield
    finally:
        for owner, name, layer in swapped:
            setattr(owner, name, layer)


def first(out) -> torch.Tensor:
    return (out[0] if isinstance(out, tuple) else out).float()


def timed(device, module, args, benchmark: bool, cudnn_attention: bool, reference: torch.Tensor | None) -> dict:
    row: dict = {}
    with warnings.catch_warnings(record=True) as said:  # PyTorch says why a kernel was not eligible as warnings
        warnings.simplefilter("always")
        try:
            with choices(benchmark, cudnn_attention):
                out = first(module(*args))
                row["ms"] = graph_ms(device, lambda: module(*args), 20)
            if reference is not None:
                row["max_abs_diff"] = (out - reference).abs().max().item()
        except RuntimeError as error:  # cuDNN's attention refusing a shape, for one
            row["error"] = str(error).splitlines()[0][:300]
    reasons = sorted({str(w.message)[:200] for w in said if "cudnn" in str(w.message).lower()})
    if reasons:
        row["warnings"] = reasons[:3]
    return row


def kernel_shares(module, args) -> dict:
    """Milliseconds of the GPU kernels of one eager call, grouped by name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        module(*args)
        torch.cuda.synchronize()
    groups: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        name = event.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[group] += getattr(event, "device_time_total", 0.0) / 1000
    return {k: round(v, 2) for k, v in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--networks", default="lcm,kv,vae")
    parser.add_argument("--compile", default="lcm,vae", help="networks also compiled (Inductor, default mode); '' none")
    parser.add_argument("--fused-only", action="store_true", help="only the plain and fused-projection eager rows")
    args = parser.parse_args()
    model = Personalizer.from_pretrained(PRESET, device=DEVICE, faces=None)  # a CPU dry run: see compile_probe.py
    device, results = model.device, {"device": str(model.device), "torch": torch.__version__, "rows": []}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name()

    def save(row: dict) -> None:
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(results, indent=1))

    with torch.inference_mode():
        for network in args.networks.split(","):
            module, call_args = network_call(model, network, 1, False)
            reference = first(module(*call_args))
            save({"network": network, "way": "eager", **timed(device, module, call_args, False, False, reference)})
            if network != "vae":  # the decode has no appended-K/V self-attention
                with fused_projections(module, with_handed_kv=network == "kv"):
                    save({"network": network, "way": "eager", "fused_projections": True,
                          **timed(device, module, call_args, False, False, reference)})  # fmt: skip
            if args.fused_only:
                continue
            if network == "lcm" and device.type == "cuda":
                save({"network": network, "way": "eager kernel ms", **kernel_shares(module, call_args)})
            for benchmark, attention in ((True, False), (False, True), (True, True)):
                if network == "vae" and attention:
                    continue  # the decode's one attention layer is at 128^2 tokens / 64: not worth a row
                save({"network": network, "way": "eager", "cudnn_benchmark": benchmark, "cudnn_attention": attention,
                      **timed(device, module, call_args, benchmark, attention, reference)})  # fmt: skip
            if network not in args.compile.split(","):
                continue
            for attention in (False, True) if network != "vae" else (False,):
                compiled = torch.compile(module, dynamic=False)
                begin = time.perf_counter()
                try:
                    with choices(False, attention):  # the attention kernel is chosen while tracing
                        compiled(*call_args)
                except RuntimeError as error:
                    save({"network": network, "way": "compiled", "cudnn_attention": attention, "error": str(error)[:300]})
                    continue
                compile_s = time.perf_counter() - begin
                for benchmark in (False, True):
                    save({"network": network, "way": "compiled", "cudnn_benchmark": benchmark, "cudnn_attention": attention,
                          "compile_s": round(compile_s, 1), **timed(device, compiled, call_args, benchmark, attention, reference)})  # fmt: skip
                torch._dynamo.reset()
    for row in results["rows"]:
        print(row)


if __name__ == "__main__":
    main()
