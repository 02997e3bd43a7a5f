"""Probe: does the fast mode's K/V pass pay on a second CUDA stream beside the first steps (issue 19)?

Fast mode at batch 1 computes the K/V of its 4 steps ahead in one 4-row pass of the K/V-encoder, then replays the
step's graph 4 times. A batch-1 denoiser leaves much of an H100 idle (a 1024-token GEMM has fewer tiles than the
card has SMs), so part of the K/V pass might run beside the first steps on a second stream. Each schedule splits the
steps' K/V into passes: the first on the main stream, the others queued on a side stream that the main stream waits
for (by event) only before the first step that needs them, as the library would do it. Schedules (``+`` separates the
passes, in steps):

* ``4``: today's one pass, then the 4 steps;
* ``2+2``, ``1+3``: the second pass beside the first steps;
* ``1+1+1+1``: each step's K/V beside the step before.

And pairs, ``KxD``: a K-row K/V pass and a D-row denoiser call (of the LCM denoiser, D rows each taking K/V) in one
CUDA graph, one after the other or side by side on two streams: what running the next step's K/V beside a step would
give inside a step's graph (quality mode's step is K/V 2 rows, denoiser 4 rows).

Every network is the model's own, eager or compiled (Inductor, default mode, static shapes); the denoiser step is a
CUDA graph reading the K/V from a flat buffer, the K/V passes run uncaptured (as in the library). Prints one JSON line
a row and writes JSON. A CPU dry run: ``PROBE_PRESET=tiny PROBE_DEVICE=cpu PROBE_SIZE=128``.

    python benchmarks/overlap_probe.py --out $OUT/overlap.json      # on the GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from compile_probe import DEVICE, PRESET, network_call

from lcmla_sdk import Personalizer
from lcmla_sdk.bench_timing import graph_ms, measure
from lcmla_sdk.cuda_graphs import capture
from lcmla_sdk.sampling import flatten_kv, unflatten_kv


def schedules(names: str) -> list[tuple[int, ...]]:
    return [tuple(int(part) for part in name.split("+")) for name in names.split(",")]


class Probe:
    """A K/V-encoder and a captured batch-1 denoiser step (the model's own networks, eager or compiled), and the
    schedules timed over them."""

    def __init__(self, model: Personalizer, encoder, denoiser) -> None:
        self.model, self.encoder, self.cuda = model, encoder, model.device.type == "cuda"
        args = list(network_call(model, "lcm", 1, False)[1])
        flat, self.layout = flatten_kv(args[7])
        self.kv_buffer = flat.clone()  # what the library's step reads: one flat row of K/V, copied in before a step
        args[7] = unflatten_kv(self.kv_buffer, self.layout)
        self.step = capture(lambda _: denoiser(*args), None).replay if self.cuda else (lambda: denoiser(*args))
        self.side = torch.cuda.Stream() if self.cuda else None
        self.kv_args: dict[int, tuple] = {}

    def kv_pass(self, rows: int) -> torch.Tensor:
        """``(rows, elements)`` flat K/V of ``rows`` steps, laid out as the library's pass ahead lays them."""
        if rows not in self.kv_args:
            self.kv_args[rows] = network_call(self.model, "kv", rows, False)[1]
        return flatten_kv(self.encoder(*self.kv_args[rows]))[0]

    def run(self, schedule: tuple[int, ...]) -> None:
        """The first pass on the main stream, the others queued on the side stream; each step waits only for the
        pass holding its K/V."""
        passes, ready = [self.kv_pass(schedule[0])], [None]
        for rows in schedule[1:]:
            if not self.cuda:
                passes.append(self.kv_pass(rows))
                ready.append(None)
                continue
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                flat = self.kv_pass(rows)
                event = torch.cuda.Event()
                event.record(self.side)
            flat.record_stream(torch.cuda.current_stream())
            passes.append(flat)
            ready.append(event)
        for flat, event in zip(passes, ready):
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
            for row in range(flat.shape[0]):
                self.kv_buffer.copy_(flat[row : row + 1])
                self.step()

    def pair(self, kv_rows: int, denoiser, denoiser_rows: int) -> dict:
        """Milliseconds of a ``kv_rows`` K/V pass and a ``denoiser_rows`` denoiser call in one graph, one after the
        other and side by side."""
        kv_args = network_call(self.model, "kv", kv_rows, False)[1]
        args = network_call(self.model, "lcm", denoiser_rows, False)[1]

        def serial():
            self.encoder(*kv_args)
            denoiser(*args)

        def beside():
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self.encoder(*kv_args)
            denoiser(*args)
            torch.cuda.current_stream().wait_stream(self.side)

        device = self.model.device
        return {"serial_ms": graph_ms(device, serial, 20), "beside_ms": graph_ms(device, beside, 20) if self.cuda else None}


def timed(device: torch.device, work, iters: int) -> float:
    return round(measure(device, work, iters)[1], 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--schedules", default="4,2+2,1+3,1+1+1+1")
    parser.add_argument("--compiled-schedules", default="4,2+2", help="also with compiled networks; '' none")
    parser.add_argument("--pairs", default="1x1,2x1,2x4", help="KxD: K/V rows x denoiser rows, eager only")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    model = Personalizer.from_pretrained(PRESET, device=DEVICE, faces=None)
    results = {"device": str(model.device), "torch": torch.__version__, "rows": []}
    if model.device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name()

    def save(row: dict) -> None:
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(results, indent=1))

    ways = [("eager", schedules(args.schedules))]
    if args.compiled_schedules:
        ways.append(("compiled", schedules(args.compiled_schedules)))
    with torch.inference_mode():
        for way, chosen in ways:
            begin = time.perf_counter()
            with compiled_networks(model, way == "compiled") as (encoder, denoiser):
                probe = Probe(model, encoder, denoiser)
                for count in sorted({rows for schedule in chosen for rows in schedule}):  # compiles each pass, if so
                    save({"way": way, "kv_rows": count, "ms": timed(model.device, lambda: probe.kv_pass(count), args.iters)})
                save({"way": way, "step_ms": timed(model.device, probe.step, args.iters),
                      "setup_s": round(time.perf_counter() - begin, 1)})  # fmt: skip
                for schedule in chosen:
                    save({"way": way, "schedule": "+".join(map(str, schedule)),
                          "ms": timed(model.device, lambda: probe.run(schedule), args.iters)})  # fmt: skip
                for pair in args.pairs.split(",") if way == "eager" and args.pairs else ():
                    kv_rows, denoiser_rows = map(int, pair.split("x"))
                    save({"way": way, "pair": pair, **probe.pair(kv_rows, denoiser, denoiser_rows)})
    for row in results["rows"]:
        print(row)


@contextlib.contextmanager
def compiled_networks(model: Personalizer, compiled: bool):
    """The model's K/V-encoder and LCM denoiser, compiled whole (static shapes) when ``compiled``."""
    networks = model.kv_encoder, model.lcm_denoiser
    if not compiled:
        yield networks
        return
    try:
        yield tuple(torch.compile(module, dynamic=False) for module in networks)
    finally:
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
