"""Generating a set: batches through the Turbo pipeline, per-identity checks and atomic writes, resume, summary.

An identity is the unit of completion: its images are written (atomically, each under a temporary name first), then
its ``identity.json`` (kept images and seeds, dropped images and why, face measures). A run skips identities whose
record and images exist and regenerates only the missing images of the others, so a second run completes what a
killed one left. ``metadata.json`` (or, for a shard, ``shards/metadata-I-of-N.json``) and ``summary.json`` are
rebuilt from the records when a run ends, also when it is interrupted.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..atomic import write_bytes, write_error, write_json
from ..errors import InvalidImageError, LcmlaError
from ..faces import FaceAnalyzer
from ..images import load_rgb
from .consistency import AnchorAttnProcessor, anchor_arguments, check_identity
from .descriptions import Identity
from .layout import IDENTITY_RECORD, check_identity_record, prepare_output, read_record, write_results
from .plan import ImageJob, PlanOptions, Shard, image_jobs

JPEG_QUALITY = 95


@dataclass
class Row:
    """An image to compute; ``write`` is False for an anchor already on disk, computed again only because its
    identity's other images attend to it."""

    job: ImageJob
    write: bool


class SetGenerator:
    """Generates the images of :class:`PlanOptions` with a Turbo pipeline (:func:`~lcmla_sdk.data.turbo.load_turbo`).

    ``batch_size``: images per pipeline call; ``writers``: threads that check faces, encode JPEGs and write, while
    the device computes the next batch; ``analyzer``: builds one face analyzer per writer thread (``None``: no
    face measure; required by the filter). Attention mode installs :class:`AnchorAttnProcessor` on ``pipe.unet``.
    """

    def __init__(
        self,
        pipe,
        options: PlanOptions,
        batch_size: int = 8,
        writers: int = 4,
        analyzer: Callable[[], FaceAnalyzer] | None = None,
    ) -> None:
        least = options.anchor_count + 1  # an identity's anchors and one more image
        if not isinstance(batch_size, int) or batch_size < least:
            raise ValueError(f"batch_size: expected an integer >= {least}, got {batch_size!r}")
        if "filter" in options.consistent and analyzer is None:
            raise ValueError("faces: the filter needs a face analyzer")
        self.pipe, self.options, self.batch_size, self.writers = pipe, options, batch_size, writers
        self._analyzer, self._local = analyzer, threading.local()
        if "attention" in options.consistent:
            pipe.unet.set_attn_processor(AnchorAttnProcessor())

    def run(
        self,
        identities: list[Identity],
        out: str | Path,
        run_record: dict,
        shard: Shard = Shard(),
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict:
        """Generate what ``out`` lacks of the shard's identities; return the summary (also written to ``out``)."""
        out = Path(out)
        # 1. Check the output folder and that an earlier run there made the same set.
        prepare_output(out, run_record)
        # 2. What is left to do: per identity, the images to compute.
        chosen = shard.select(identities)
        work = [(identity, self._pending(out, identity)) for identity in chosen]
        work = [(identity, rows) for identity, rows in work if rows is not None]
        total = sum(row.write for _, rows in work for row in rows)
        begin, written = time.perf_counter(), 0
        if on_progress:
            on_progress(0, total)
        # 3. Generate batch by batch; an identity is finished (checked, written) once all its rows are back.
        pool = ThreadPoolExecutor(max_workers=self.writers, thread_name_prefix="lcmla-data")
        futures: list[Future] = []
        try:
            results: dict[int, dict[str, tuple[Image.Image, bool]]] = {}
            for identity, rows in work:  # every image on disk, only the check and record are missing
                if not any(row.write for row in rows):
                    futures.append(pool.submit(self._finish, out, identity, {}))
            chunks_left = Counter()
            batches = list(self._batches([rows for _, rows in work if any(row.write for row in rows)]))
            for batch in batches:
                for chunk in batch:
                    chunks_left[chunk[0].job.identity.index] += 1
            for batch in batches:
                images = self._generate(batch)
                rows = [row for chunk in batch for row in chunk]
                for row, image in zip(rows, images):
                    found = results.setdefault(row.job.identity.index, {})
                    if row.write or row.job.relative not in found:  # an anchor repeated in a later chunk
                        found[row.job.relative] = (image, row.write)
                for chunk in batch:
                    identity = chunk[0].job.identity
                    chunks_left[identity.index] -= 1
                    if chunks_left[identity.index] == 0:
                        futures.append(pool.submit(self._finish, out, identity, results.pop(identity.index)))
                written += sum(row.write for row in rows)
                futures = _raise_failures(futures, wait_above=2 * self.writers)
                if on_progress:
                    on_progress(written, total)
            _raise_failures(futures, wait_above=0)
        except BaseException:
            pool.shutdown(wait=True)  # identities already generated are still written and recorded
            with contextlib.suppress(OSError, LcmlaError):  # the first error is the one to report
                write_results(out, chosen, shard)
            raise
        pool.shutdown(wait=True)
        seconds = time.perf_counter() - begin
        summary = write_results(out, chosen, shard)
        summary["this_run"] = {
            "images_generated": written, "seconds": round(seconds, 2),
            "images_per_second": round(written / seconds, 3) if written and seconds > 0 else None,
        }  # fmt: skip
        return summary

    # ------------------------------------------------------------------ planning
    def _pending(self, out: Path, identity: Identity) -> list[Row] | None:
        """``None`` for a finished identity, else its rows: missing images, and its anchors in attention mode."""
        path = out / identity.folder / IDENTITY_RECORD
        record = read_record(path)
        if record is not None:
            check_identity_record(record, identity, path)
        if record is not None and all((out / path).is_file() for path in record["images"]):
            return None
        jobs = image_jobs(identity, self.options)
        missing = {job.relative for job in jobs if not (out / job.relative).is_file()}
        anchors = [Row(job, write=job.relative in missing) for job in jobs if job.anchor]
        return anchors + [Row(job, True) for job in jobs if job.relative in missing and not job.anchor]

    def _batches(self, work: list[list[Row]]) -> Iterator[list[list[Row]]]:
        """Batches of chunks; a chunk is one identity's rows, its anchors first, never split across batches."""
        batch: list[list[Row]] = []
        for rows in work:
            anchors = [row for row in rows if row.job.anchor]
            members = [row for row in rows if not row.job.anchor]
            step = self.batch_size - len(anchors)
            for start in range(0, max(1, len(members)), step):
                first = start == 0
                chunk = [row if first else Row(row.job, False) for row in anchors] + members[start : start + step]
                if len(batch) and sum(map(len, batch)) + len(chunk) > self.batch_size:
                    yield batch
                    batch = []
                batch.append(chunk)
        if batch:
            yield batch

    # ------------------------------------------------------------------ the device
    @torch.inference_mode()
    def _generate(self, batch: list[list[Row]]) -> list[Image.Image]:
        rows = [row for chunk in batch for row in chunk]
        attention = None
        if self.options.anchor_count:
            groups, offset = [], 0
            for chunk in batch:
                groups.append((len(chunk), list(range(offset, offset + self.options.anchor_count))))
                offset += len(chunk)
            attention = anchor_arguments(groups, self.pipe.device)
        # One CPU generator per image, seeded as the authors' script seeds it: a seed gives their image.
        generators = [torch.Generator().manual_seed(row.job.seed) for row in rows]
        size = self.options.size
        return self.pipe(
            prompt=[row.job.prompt for row in rows], num_inference_steps=1, guidance_scale=0.0, height=size,
            width=size, generator=generators, cross_attention_kwargs=attention,
        ).images  # fmt: skip

    # ------------------------------------------------------------------ per identity, on a writer thread
    def _finish(self, out: Path, identity: Identity, generated: dict[str, tuple[Image.Image, bool]]) -> None:
        jobs = image_jobs(identity, self.options)
        check = None
        if self._analyzer is not None:
            if not hasattr(self._local, "analyzer"):
                self._local.analyzer = self._analyzer()
            photos = {job.relative: self._image(out, job, generated) for job in jobs if job.vanilla}
            others = [job.relative for job in jobs if not job.vanilla]
            filtering = "filter" in self.options.consistent
            check = check_identity(self._local.analyzer, photos, others, self.options.threshold, filtering)
        dropped = check.dropped if check else {}
        for relative, (image, write) in generated.items():
            if write and relative not in dropped:
                # Encoded in memory, then written whole: PIL's own file writes can stop short without an error
                # when the file size limit cuts a write (seen with RLIMIT_FSIZE).
                encoded = io.BytesIO()
                image.save(encoded, format="JPEG", quality=JPEG_QUALITY)
                write_bytes(out / relative, encoded.getvalue())
        for relative in dropped:
            (out / relative).unlink(missing_ok=True)  # left by an interrupted run before the identity was checked
        record = {
            "index": identity.index,
            "description": identity.description,
            "images": {job.relative: job.seed for job in jobs if job.relative not in dropped},
            "dropped": dropped,
        }
        if check is not None:
            record["faces"] = {"backend": self._local.analyzer.name, "detected": check.faces, "within": check.within,
                               "embedding": check.embedding}  # fmt: skip
        write_json(out / identity.folder / IDENTITY_RECORD, record, indent=1)

    @staticmethod
    def _image(out: Path, job: ImageJob, generated: dict[str, tuple[Image.Image, bool]]) -> Image.Image:
        if job.relative in generated:
            return generated[job.relative][0]
        try:
            return load_rgb(out / job.relative)
        except InvalidImageError as error:
            raise write_error(out / job.relative, OSError(str(error))) from None


def _raise_failures(futures: list[Future], wait_above: int) -> list[Future]:
    """Re-raise a writer's error; wait for the oldest while more than ``wait_above`` identities are in flight."""
    while len(futures) > wait_above:
        futures.pop(0).result()
    for future in [f for f in futures if f.done()]:
        future.result()
    return [f for f in futures if not f.done()]
