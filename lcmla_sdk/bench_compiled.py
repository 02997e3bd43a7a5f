"""The compiled ways of ``lcmla bench``: the folder of compiled networks built (and its cold start timed) in other
processes, then loaded into the benchmarked model; and ``--compare`` of two result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_COLD_START = """
import json, sys, time
begin = time.perf_counter()
import torch
from lcmla_sdk import Personalizer
preset, folder, size, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
seconds = {"import_s": time.perf_counter() - begin}
model = Personalizer.from_pretrained(preset, device=device, faces=None, compiled=folder)
seconds["load_s"] = time.perf_counter() - begin - sum(seconds.values())
identity = model.encode_face(torch.rand(size, size, 3).numpy())
model.generate(identity, "a face", mode="fast", height=size, width=size, output="pt")
torch.cuda.synchronize() if device.startswith("cuda") else None
seconds["first_image_s"] = time.perf_counter() - begin - sum(seconds.values())
print("COLD " + json.dumps(seconds))
"""


def cold_start(preset: str, folder: Path, size: int, device: str) -> dict[str, float]:
    """Seconds a fresh process (empty Inductor cache) takes to its first fast image with the compiled folder:
    ``import_s`` (torch and lcmla), ``load_s`` (``from_pretrained(..., compiled=folder)``), ``first_image_s`` (face
    encoding and the call, with each network's function loaded from the folder), ``to_first_image_s`` (from
    ``from_pretrained`` on: the last two) and ``total_s`` (the whole process, from its start to its exit)."""
    with tempfile.TemporaryDirectory() as cache:
        begin = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _COLD_START, preset, str(folder), str(size), device], check=True,
                              env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache), stdout=subprocess.PIPE, text=True)  # fmt: skip
        total = time.perf_counter() - begin
    parts = json.loads([line for line in done.stdout.splitlines() if line.startswith("COLD ")][-1][5:])
    return {"total_s": total, "to_first_image_s": parts["load_s"] + parts["first_image_s"], **parts}


def use_compiled(model, config, runs: list[tuple[str, str]], report: Callable[[str], None]) -> dict[str, Any]:
    """Switch ``model`` to the compiled networks of ``config.compiled``, building the folder first for the compiled
    ``runs`` when it does not exist (then its build time and a cold start are measured too)."""
    from .engines.compiled import CompiledShape, build_compiled

    folder = Path(config.compiled or "compiled")
    facts: dict[str, Any] = {"folder": str(folder)}
    if not (folder / "compiled.json").exists():
        shapes = [CompiledShape(mode, batch, config.size, config.size)
                  for mode, way in runs if way.startswith("compiled")
                  for batch in (sorted({1, config.batch}) if mode == "fast" else (1,))]  # fmt: skip
        manifest = build_compiled(config.preset, folder, shapes, str(model.device), log=report)
        facts["build_s"] = float(manifest["build_s"])
        report(f"built the compiled networks in {facts['build_s']:.0f} s")
        facts["cold_start"] = cold_start(config.preset, folder, config.size, str(model.device))
        cold = facts["cold_start"]
        report(f"cold start: {cold['to_first_image_s']:.1f} s from from_pretrained to the first fast image in a fresh "
               f"process ({cold['total_s']:.1f} s for the whole process)")  # fmt: skip
    begin = time.perf_counter()
    model.use_exported(folder, backend="torch")
    facts["load_s"] = time.perf_counter() - begin
    return facts


def compare(first: dict[str, Any], second: dict[str, Any]) -> str:
    """A Markdown table of the rows two runs share: milliseconds of each and the first over the second."""
    before = {(r["mode"], r["way"], r["batch"]): r["ms"] for r in first["rows"]}
    lines = ["| mode | way | batch | first ms | second ms | first / second |", "|---|---|---|---|---|---|"]
    for r in second["rows"]:
        key = (r["mode"], r["way"], r["batch"])
        if key in before:
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {before[key]:.1f} | {r['ms']:.1f} | "
                         f"{before[key] / r['ms']:.2f}x |")  # fmt: skip
    return "\n".join(lines)
