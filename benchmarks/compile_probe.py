"""Probe: what torch.compile gives each network of the sampling step, and what it costs to build and to load.

Each variant runs in its own process with its own Inductor cache folder, so every compile is cold unless the variant
loads the artefacts an earlier one saved. The variants of one batch run at once (the device has 16 cores; compiling
is mostly CPU work) and time their networks one process at a time, after every process of the batch has compiled,
so no timing shares the GPU. Prints one JSON line per variant and a table at the end.

    python benchmarks/compile_probe.py --out $OUT/probe.json      # on the GPU
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# A CPU dry run of this script: PROBE_PRESET=tiny PROBE_DEVICE=cpu PROBE_SIZE=128.
PRESET, DEVICE = os.environ.get("PROBE_PRESET", "sdxl"), os.environ.get("PROBE_DEVICE", "cuda")
SIZE = int(os.environ.get("PROBE_SIZE", "1024"))
FLAGS = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True, "conv_1x1_as_mm": True}
# name: (network, rows, options). Options: "dynamic", "inductor" (config patches), "mode", "sdpa" ("cudnn": cuDNN's
# attention first, eager and compiled), "channels_last", "then_rows" (also time that many rows, recompiled),
# "load" (the artefacts of that variant, loaded first: a warm start), "aot" ("save": Dynamo's ahead-of-time compile,
# saved; "load": the one variant "from" saved, loaded without tracing), "after" (a later batch).
VARIANTS = {
    "kv_b1": ("kv", 1, {"dynamic": False, "then_rows": 4}),
    "lcm_b1": ("lcm", 1, {"dynamic": False}),
    "lcm_b1_flags": ("lcm", 1, {"dynamic": False, "inductor": FLAGS}),
    "lcm_b1_cudnn": ("lcm", 1, {"dynamic": False, "sdpa": "cudnn"}),
    "vae_b1": ("vae", 1, {"dynamic": False}),
    "vae_b1_channels_last": ("vae", 1, {"dynamic": False, "channels_last": True}),
    "vae_b1_autotune": ("vae", 1, {"dynamic": False, "mode": "max-autotune-no-cudagraphs"}),
    "kv_b1_load": ("kv", 1, {"dynamic": False, "load": "kv_b1", "after": 1}),
    "kv_b1_aot": ("kv", 1, {"aot": "save"}),
    "kv_b1_aot_load": ("kv", 1, {"aot": "load", "from": "kv_b1_aot", "after": 1}),
    "lcm_b1_aot": ("lcm", 1, {"aot": "save"}),
    "lcm_b1_aot_load": ("lcm", 1, {"aot": "load", "from": "lcm_b1_aot", "after": 1}),
}


def network_call(model, network: str, rows: int, channels_last: bool):
    """``(module, args)`` at ``rows`` rows, 1024^2, with the model's real argument layout."""
    import torch

    from lcmla_sdk.compiling import VaeDecode
    from lcmla_sdk.text import time_ids

    device, dtype = model.device, model.dtype
    g = torch.Generator(device).manual_seed(0)
    side, face_side = SIZE // model.vae_scale, model.face_size // model.vae_scale
    text, pooled = (x.expand(rows, *x.shape[1:]) for x in model.prompt_encoder.encoder_prompt())
    ids, t = time_ids(SIZE, SIZE, rows, dtype, device), torch.full((rows,), 500.0, device=device)
    if network == "vae":
        if channels_last:
            model.vae.to(memory_format=torch.channels_last)
        latent = torch.randn(rows, 4, side, side, device=device, dtype=dtype, generator=g)
        return VaeDecode(model.vae), (latent,)
    face = torch.randn(rows, 4, face_side, face_side, device=device, dtype=dtype, generator=g)
    if network == "kv":
        return model.kv_encoder, (face, t, text, pooled, ids)
    kv = tuple(x.contiguous() for x in model.kv_encoder(face, t, text, pooled, ids))
    latent = torch.randn(rows, 4, side, side, device=device, dtype=dtype, generator=g)
    tokens = torch.randn(rows, 16, model.unet.config.cross_attention_dim, device=device, dtype=dtype, generator=g)
    args = (latent, t, text, pooled, ids, tokens, torch.ones(rows, device=device), kv, torch.tensor([1.1, 0.2], device=device))
    return model.lcm_denoiser, args


def child(name: str, work: Path, expected: int) -> dict:
    import torch

    from lcmla_sdk import Personalizer

    network, rows, options = VARIANTS[name]
    torch._dynamo.config.cache_size_limit = 64
    result: dict = {"name": name, "rows": rows, "torch": torch.__version__}
    begin = time.perf_counter()
    model = Personalizer.from_pretrained(PRESET, device=DEVICE, faces=None)
    result["load_model_s"] = time.perf_counter() - begin
    if "load" in options:
        begin = time.perf_counter()
        torch.compiler.load_cache_artifacts((work / f"{options['load']}.bin").read_bytes())
        result["load_artifacts_s"] = time.perf_counter() - begin

    try:
        with torch.inference_mode():
            return _compile_and_time(model, network, rows, options, result, work, expected)
    finally:
        (work / f"ready.{name}").touch()  # a failed compile must not hold the others at the barrier


def _compile_and_time(model, network, rows, options, result, work, expected) -> dict:
    import torch

    from lcmla_sdk.bench_timing import graph_ms

    def first(out):
        return (out[0] if isinstance(out, tuple) else out).float()

    name = result["name"]
    module, args = network_call(model, network, rows, options.get("channels_last", False))
    call = _cudnn_attention_first(args) if options.get("sdpa") == "cudnn" else lambda m: m(*args)
    reference = first(call(module))
    begin = time.perf_counter()
    if options.get("aot"):
        compiled = _aot(module, args, options["aot"], work / f"{options.get('from', name)}.aot", result)
    else:
        compiled = torch.compile(module, dynamic=options.get("dynamic"), mode=options.get("mode"),
                                 options=options.get("inductor"))  # fmt: skip
    out = first(call(compiled))
    torch.cuda.synchronize() if DEVICE == "cuda" else None
    result["compile_s"] = time.perf_counter() - begin
    result["max_abs_diff"] = (out - reference).abs().max().item()
    result["ref_abs_max"] = reference.abs().max().item()
    if "load" not in options and not options.get("aot"):
        blob = torch.compiler.save_cache_artifacts()
        if blob is not None:
            (work / f"{name}.bin").write_bytes(blob[0])
            result["artifact_mb"] = len(blob[0]) / 2**20
    then = options.get("then_rows")
    if then:
        module_b, args_b = network_call(model, network, then, False)
        call_b = lambda m: m(*args_b)  # noqa: E731
        begin = time.perf_counter()
        call_b(compiled)
        torch.cuda.synchronize() if DEVICE == "cuda" else None
        result[f"compile_b{then}_s"] = time.perf_counter() - begin
    # Time only once every process of this batch has compiled, one process at a time.
    (work / f"ready.{name}").touch()
    deadline = float(os.environ["PROBE_BARRIER_UNTIL"])  # a slow compile must not keep the others from timing
    while len(list(work.glob("ready.*"))) < expected and time.time() < deadline:
        time.sleep(1)
    with open(work / "gpu.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result["eager_graph_ms"] = graph_ms(model.device, lambda: call(module), 20)
        result["compiled_graph_ms"] = graph_ms(model.device, lambda: call(compiled), 20)
        if then:
            result[f"eager_b{then}_graph_ms"] = graph_ms(model.device, lambda: call_b(module_b), 10)
            result[f"compiled_b{then}_graph_ms"] = graph_ms(model.device, lambda: call_b(compiled), 10)
    return result


def _cudnn_attention_first(args):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def with_cudnn(module):
        with sdpa_kernel(order, set_priority=True):
            return module(*args)

    return with_cudnn


def _aot(module, args, how: str, folder: Path, result: dict):
    """Ahead of time, through the code compiled folders are built and loaded with (``lcmla_sdk.compiling.AheadOfTime``):
    ``"save"`` compiles at ``args``' signature into ``folder``; ``"load"`` loads what an earlier variant saved there
    (no tracing)."""
    import functools

    from lcmla_sdk.compiling import AheadOfTime

    if how == "save":
        folder.mkdir(parents=True, exist_ok=True)
        function = AheadOfTime(folder, record=True).function("probe", module, args)
        result["artifact_mb"] = sum(p.stat().st_size for p in folder.glob("aot-*.bin")) / 2**20
    else:
        begin = time.perf_counter()
        function = AheadOfTime(folder, [p.name for p in folder.glob("aot-*.bin")]).function("probe", module, args)
        result["load_aot_s"] = time.perf_counter() - begin
    return functools.partial(function, module)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--child", default=None)
    parser.add_argument("--expected", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--budget", type=float, default=540, help="seconds; variants still running then are stopped")
    args = parser.parse_args()
    stop = time.perf_counter() + args.budget
    work = Path("/tmp/probe_work")  # artefacts of tens of MB: not under --out
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, work, args.expected)), flush=True)
        return
    names = args.only.split(",") if args.only else list(VARIANTS)
    results = []
    for batch in sorted({VARIANTS[n][2].get("after", 0) for n in names}):
        group = [n for n in names if VARIANTS[n][2].get("after", 0) == batch]
        for ready in work.glob("ready.*"):
            ready.unlink()
        begin = time.perf_counter()
        procs = {n: subprocess.Popen(
            [sys.executable, __file__, "--out", str(args.out), "--child", n, "--expected", str(len(group))],
            env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"/tmp/inductor_{n}",
                     PROBE_BARRIER_UNTIL=str(time.time() + stop - time.perf_counter() - 15 * len(group))), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True) for n in group}  # fmt: skip
        for name, proc in procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=max(1.0, stop - time.perf_counter()))
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
                stderr += "\nstopped: over the probe's time budget"
            lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"name": name, "error": stderr[-1500:]}
            row["batch_wall_s"] = time.perf_counter() - begin
            results.append(row)
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps(results, indent=1))
    for row in results:
        print(f"{row['name']:24s} eager {row.get('eager_graph_ms', 0):7.2f} ms  compiled {row.get('compiled_graph_ms', 0):7.2f} ms"
              f"  compile {row.get('compile_s', 0):6.1f} s  diff {row.get('max_abs_diff', 0):.1e}")


if __name__ == "__main__":
    main()
