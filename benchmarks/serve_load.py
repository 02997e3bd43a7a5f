"""Load test of ``lcmla serve`` on a GPU: single-image requests arriving open-loop at increasing rates, against the
same model called in-process one request at a time (batch 1) and at batch 8.

    python benchmarks/serve_load.py --preset sdxl --out $OUT/serve.json [--modes fast,quality] [--identities 1,16]

Per mode: the in-process batch-1 latency and batch-8 throughput; then the service (one replica per GPU, batches of
``--batch``) is started on this machine and, for 1 and 16 distinct identities, requests are sent at fractions of the
batch-8 throughput (``--loads``) for ``--seconds`` each: completed images/s, p50/p95 latency, the mean pass size and
the errors. Identities are random tensors of the preset's shapes (the preset's weights are random too: speed does
not depend on values). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lcmla_sdk

from lcmla_sdk import Personalizer  # noqa: E402
from lcmla_sdk.identity import Identity  # noqa: E402
from lcmla_sdk.serve import ServeSettings, launch  # noqa: E402
from lcmla_sdk.serve.store import IdentityStore, identity_id  # noqa: E402

PROMPT = "An oil painting of a face"


def random_identity(model: Personalizer, seed: int) -> Identity:
    g = torch.Generator().manual_seed(seed)
    tokens, width = model.adapter.resampler.latents.shape[1], model.unet.config.cross_attention_dim
    side = model.face_size // model.vae_scale
    return Identity(
        cond_tokens=torch.randn(1, tokens, width, generator=g), uncond_tokens=torch.randn(1, tokens, width, generator=g),
        latent_mean=torch.randn(1, 4, side, side, generator=g), latent_std=torch.rand(1, 4, side, side, generator=g),
        model_fingerprint=model.fingerprint,
    )  # fmt: skip


def in_process(model: Personalizer, identity: Identity, mode: str, steps: int, size: int, batch: int, iters: int) -> dict:
    def call(images: int) -> float:
        torch.cuda.synchronize() if model.device.type == "cuda" else None
        begin = time.perf_counter()
        model.generate(identity, [PROMPT] * images, seed=list(range(images)), mode=mode, steps=steps, height=size, width=size)
        torch.cuda.synchronize() if model.device.type == "cuda" else None
        return time.perf_counter() - begin

    call(1), call(batch)  # captures the graphs of both shapes
    b1 = statistics.median(call(1) for _ in range(iters))
    bn = statistics.median(call(batch) for _ in range(iters))
    return {"batch1_ms": b1 * 1000, "batch1_images_s": 1 / b1, f"batch{batch}_images_s": batch / bn}


async def open_loop(url: str, ids: list[str], mode: str, steps: int, size: int, rate: float, seconds: float,
                    image_format: str, bare: bool = False) -> dict:
    """Requests at exponential intervals of mean 1/rate for ``seconds``; each answer's latency, pass size, status;
    ``bare``: each answered with the bare image (``Accept: image/...``) instead of JSON with base64.
    ``images_s`` counts every answer over the whole run, drain included; ``steady_images_s`` only the answers that
    came while requests were still being sent, after the first third (passes start small and grow as a backlog
    forms, and shrink again once sending stops)."""
    results: list[tuple[int, float, int, float]] = []  # status, latency, pass images, when it was answered
    timings: list[dict] = []  # the server's own: queue_ms, generate_ms (the pass) and total_ms (the ingress's)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(index: int) -> None:
            body = {"identity": ids[index % len(ids)], "prompt": PROMPT, "seed": index, "mode": mode, "steps": steps,
                    "height": size, "width": size, "format": image_format}  # fmt: skip
            headers = {"Accept": f"image/{image_format}"} if bare else {}
            begin = time.perf_counter()
            async with session.post(f"{url}/v1/generate", json=body, headers=headers) as response:
                answer = await (response.read() if bare and response.status == 200 else response.json())
            end = time.perf_counter()
            if response.status != 200:
                results.append((response.status, end - begin, 0, end))
                return
            if bare:
                server = dict(part.split(";dur=") for part in response.headers["Server-Timing"].split(", "))
                answer = {"batch": {"pass_images": int(response.headers["X-Pass-Images"])},
                          "timings": {f"{name}_ms": float(ms) for name, ms in server.items()}}  # fmt: skip
            results.append((response.status, end - begin, answer["batch"]["pass_images"], end))
            timings.append({**answer["timings"], "client_ms": (end - begin) * 1000})

        tasks, start, index, rng = [], time.perf_counter(), 0, random.Random(0)
        while time.perf_counter() - start < seconds:
            tasks.append(asyncio.create_task(one(index)))
            index += 1
            await asyncio.sleep(rng.expovariate(rate))
        sent_until = time.perf_counter()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ok = [row for row in results if row[0] == 200]
    latencies = sorted(latency for _, latency, _, _ in ok)
    quantile = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if ok else None  # noqa: E731
    steady_from = start + (sent_until - start) / 3
    steady = sum(1 for *_, answered in ok if steady_from <= answered <= sent_until)
    return {
        "offered_per_s": rate, "format": image_format, "bare": bare, "sent": len(results), "completed": len(ok),
        "images_s": len(ok) / elapsed, "steady_images_s": steady / (sent_until - steady_from),
        "p50_ms": quantile(0.5), "p95_ms": quantile(0.95),
        "mean_pass_images": statistics.mean(images for _, _, images, _ in ok) if ok else None,
        "errors": {str(s): sum(1 for row in results if row[0] == s) for s in {row[0] for row in results if row[0] != 200}},
        "p50_parts_ms": {name: statistics.median(t[name] for t in timings) for name in timings[0]} if timings else None,
    }  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sdxl")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--modes", default="fast,quality")
    parser.add_argument("--steps", default="fast:4,quality:50", help="steps per mode")
    parser.add_argument("--identities", default="1,16")
    parser.add_argument("--loads", default="0.1,0.5,0.9,1.2", help="offered rates as fractions of in-process batch-8 images/s")
    parser.add_argument("--seconds", type=float, default=15.0, help="sending time per rate")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--format", default="png", choices=("png", "jpeg", "webp"), help="the images' format")
    parser.add_argument("--answers", default="json", help="json (base64 images), bare (Accept: image/...), or both: json,bare")
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    modes = args.modes.split(",")
    steps = {mode: int(n) for mode, n in (item.split(":") for item in args.steps.split(","))}
    counts = [int(n) for n in args.identities.split(",")]

    model = Personalizer.from_pretrained(args.preset, device=args.device, faces=None)
    size = args.size or model.default_size
    identities = [random_identity(model, seed) for seed in range(max(counts))]
    baseline = {mode: in_process(model, identities[0], mode, steps[mode], size, args.batch, args.iters) for mode in modes}
    print(json.dumps(baseline, indent=1), flush=True)
    store = IdentityStore(tempfile.mkdtemp(prefix="lcmla-bench-ids-"))
    ids = [identity_id(model.fingerprint, [f"bench-{i}"], "none", "squash") for i in range(len(identities))]
    for identity, id_ in zip(identities, ids):
        store.save(identity, id_)
    device = str(model.device)
    del model, identities
    gc.collect()  # the replica loads its own copy on this GPU
    torch.cuda.empty_cache() if torch.cuda.is_available() else None

    warmup = tuple(f"{mode}:{n}:{size}x{size}" for mode in modes for n in range(1, args.batch + 1))
    settings = ServeSettings(model=args.preset, port=free_port(), store=str(store.folder), max_batch_size=args.batch,
                             batch_wait_s=args.batch_wait_ms / 1000, max_queued_requests=100000, request_timeout_s=600,
                             warmup=warmup, device=device, faces="none")  # fmt: skip
    began = time.perf_counter()
    url = launch.start(settings)
    results = {"preset": args.preset, "size": size, "batch": args.batch, "device": torch.cuda.get_device_name() if
               torch.cuda.is_available() else "cpu", "startup_s": time.perf_counter() - began, "in_process": baseline,
               "served": []}  # fmt: skip
    try:
        for mode in modes:
            full = baseline[mode][f"batch{args.batch}_images_s"]
            for count in counts:
                for load, answers in itertools.product((float(x) for x in args.loads.split(",")), args.answers.split(",")):
                    row = asyncio.run(open_loop(url, ids[:count], mode, steps[mode], size, load * full, args.seconds,
                                                args.format, answers == "bare"))  # fmt: skip
                    row.update(mode=mode, identities=count, load=load)
                    results["served"].append(row)
                    print(json.dumps(row), flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(results, indent=1))
    finally:
        launch.stop()
    print(table(results))


def table(results: dict) -> str:
    """One row per offered rate; the steady images/s as a share of in-process batch 8, the p50 against batch 1, and
    the p50 split as the server saw it: the wait for a pass, the pass, the rest (the ingress's encoding and the
    transfers), and the client's time beyond the ingress's (HTTP, JSON)."""
    lines = ["| mode | identities | answers | offered/s | images/s (steady, of in-process b8) | p50 ms (in-process b1) | "
             "p95 ms | p50 wait / pass / rest / client ms | pass images | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    show = lambda value: f"{value:.0f}" if value is not None else "-"  # noqa: E731
    for row in results["served"]:
        base = results["in_process"][row["mode"]]
        full = base[f"batch{results['batch']}_images_s"]
        parts = row["p50_parts_ms"] or {}
        rest = parts["total_ms"] - parts["queue_ms"] - parts["generate_ms"] if parts else None
        client = parts["client_ms"] - parts["total_ms"] if parts else None
        answers = f"{'bare' if row.get('bare') else 'json'} {row['format']}"
        lines.append(
            f"| {row['mode']} | {row['identities']} | {answers} | {row['offered_per_s']:.2f} | {row['images_s']:.2f} "
            f"({row['steady_images_s']:.2f}, {row['steady_images_s'] / full:.0%} of {full:.2f}) | {show(row['p50_ms'])} "
            f"({base['batch1_ms']:.0f}) | {show(row['p95_ms'])} | {show(parts.get('queue_ms'))} / "
            f"{show(parts.get('generate_ms'))} / {show(rest)} / {show(client)} | {row['mean_pass_images'] or 0:.1f} | {row['errors'] or ''} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
