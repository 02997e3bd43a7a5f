"""Probe: what torch.compile gives each network of the sampling step, and what it costs to build and to load.

Each variant runs in a fresh process with its own Inductor cache folder, so every compile time is cold unless the
variant loads artefacts saved by an earlier one. Prints one JSON line per variant and a table at the end.

    python benchmarks/compile_probe.py --out $OUT/probe.json      # on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = [
    # (name, network, compile style, batch rows, extra)
    ("lcm_whole_b1", "lcm", "whole", 1, {}),
    ("lcm_whole_b1_warm", "lcm", "whole", 1, {"load": "lcm_whole_b1"}),
    ("kv_whole_b1", "kv", "whole", 1, {}),
    ("lcm_regional_b1", "lcm", "regional", 1, {}),
    ("kv_regional_b1", "kv", "regional", 1, {}),
    ("kv_eager_b4", "kv", "none", 4, {}),
    ("vae_whole_b1", "vae", "whole", 1, {}),
]


def child(name: str, network: str, style: str, rows: int, extra: dict, work: Path) -> dict:
    import torch

    from lcmla_sdk import Personalizer
    from lcmla_sdk.bench import _graph_ms
    from lcmla_sdk.text import time_ids

    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    result: dict = {"name": name}
    if "load" in extra:
        blob = (work / f"{extra['load']}.bin").read_bytes()
        begin = time.perf_counter()
        torch.compiler.load_cache_artifacts(blob)
        result["load_artifacts_s"] = time.perf_counter() - begin
    model = Personalizer.from_pretrained(os.environ.get("PROBE_PRESET", "sdxl"), device=os.environ.get("PROBE_DEVICE", "cuda"), faces=None)
    device, dtype = model.device, model.dtype
    side = 1024 // model.vae_scale
    face_side = model.face_size // model.vae_scale
    g = torch.Generator(device).manual_seed(0)
    with torch.inference_mode():
        (text, pooled), _ = model.encode_prompt(["An oil painting of a face"], None)
        enc_text, enc_pooled = model.encoder_prompt_embeds(rows)
        ids = time_ids(1024, 1024, rows, dtype, device)
        t = torch.full((rows,), 500.0, device=device)
        if network == "vae":
            torch.nn.Module.to(model.vae, dtype)
            latent = torch.randn(rows, 4, side, side, device=device, dtype=dtype, generator=g)
            module = model.vae
            call_module = lambda m: m.decode(latent).sample  # noqa: E731
        elif network == "kv":
            face = torch.randn(rows, 4, face_side, face_side, device=device, dtype=dtype, generator=g)
            module = model.kv_encoder
            call_module = lambda m: m(face, t, enc_text, enc_pooled, ids)  # noqa: E731
        else:
            face = torch.randn(1, 4, face_side, face_side, device=device, dtype=dtype, generator=g)
            kv = model.kv_encoder(face, t[:1], enc_text[:1], enc_pooled[:1], ids[:1])
            kv = tuple(x.expand(rows, *x.shape[1:]).contiguous() for x in kv)
            latent = torch.randn(rows, 4, side, side, device=device, dtype=dtype, generator=g)
            tokens = torch.randn(rows, 16, model.unet.config.cross_attention_dim, device=device, dtype=dtype, generator=g)
            scale = torch.ones(rows, device=device)
            freeu = torch.tensor([1.1, 0.2], device=device)
            module = model.lcm_denoiser
            args = (latent, t, text.expand(rows, -1, -1), pooled.expand(rows, -1), ids, tokens, scale, kv, freeu)
            call_module = lambda m: m(*args)  # noqa: E731
        reference = call_module(module)
        reference = reference[0] if isinstance(reference, tuple) else reference
        result["eager_graph_ms"] = _graph_ms(device, lambda: call_module(module), 20)
        if style != "none":
            begin = time.perf_counter()
            if style == "whole":
                compiled = torch.compile(module)
            else:
                compiled = module
                unet = module.unet if network != "vae" else module
                for sub in unet.modules():
                    if type(sub).__name__ in ("BasicTransformerBlock", "ResnetBlock2D"):
                        sub.compile()
            out = call_module(compiled)
            torch.cuda.synchronize() if device.type == 'cuda' else None
            result["compile_s"] = time.perf_counter() - begin
            out = out[0] if isinstance(out, tuple) else out
            result["max_abs_diff"] = (out.float() - reference.float()).abs().max().item()
            result["ref_abs_max"] = reference.float().abs().max().item()
            result["compiled_graph_ms"] = _graph_ms(device, lambda: call_module(compiled), 20)
            if style == "whole" and "load" not in extra:
                blob, _ = torch.compiler.save_cache_artifacts()
                (work / f"{name}.bin").write_bytes(blob)
                result["artifact_mb"] = len(blob) / 2**20
    result["rows"] = rows
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--child", default=None)
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    args = parser.parse_args()
    work = args.out.parent / "probe_work"
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        spec = next(v for v in VARIANTS if v[0] == args.child)
        print("RESULT " + json.dumps(child(*spec, work)), flush=True)
        return
    results = []
    names = args.only.split(",") if args.only else [v[0] for v in VARIANTS]
    for name in names:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"/tmp/inductor_{name}")
        begin = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--child", name], env=env,
                              capture_output=True, text=True)  # fmt: skip
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        row = json.loads(lines[-1][7:]) if lines else {"name": name, "error": proc.stderr[-2000:]}
        row["process_s"] = time.perf_counter() - begin
        results.append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    for row in results:
        print(f"{row['name']:22s} eager {row.get('eager_graph_ms', 0):7.2f} ms  compiled {row.get('compiled_graph_ms', 0):7.2f} ms"
              f"  compile {row.get('compile_s', 0):6.1f} s  process {row['process_s']:6.1f} s  diff {row.get('max_abs_diff', 0):.2e}")


if __name__ == "__main__":
    main()
