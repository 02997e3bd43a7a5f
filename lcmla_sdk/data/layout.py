"""The set on disk: run record, per-identity records, ``metadata.json``, summaries, and the merge of shards.

``<out>/lcmla_data.json``       options and model that made the set; a later run there must use the same
``<out>/<folder>/identity.json`` per identity: description, kept images and seeds, dropped images and why, faces
``<out>/metadata.json``         the authors' index: image path -> identity label (its description)
``<out>/summary.json``          identities, images, dropped and why, face similarity
``<out>/shards/metadata-I-of-N.json``, ``summary-I-of-N.json``: the same per shard, until ``merge`` joins them.

Everything but the images and identity records is derived from those, so it can always be rebuilt exactly.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..atomic import write_error, write_json
from ..errors import LcmlaError, WriteError
from .consistency import similarity_report
from .descriptions import Identity
from .plan import PlanOptions, Shard

FORMAT = "lcmla-data/1"
RUN_RECORD = "lcmla_data.json"
IDENTITY_RECORD = "identity.json"
METADATA = "metadata.json"
SUMMARY = "summary.json"
SHARDS = "shards"
SIMILARITY_SAMPLE = 2000  # identities whose faces are compared pairwise for the between-identity cosine


class DataSetError(LcmlaError, ValueError):
    """A set folder that cannot be continued or merged as asked (the message says why)."""


def run_record(options: PlanOptions, turbo: str) -> dict:
    return {"format": FORMAT, "turbo": turbo, "options": options.record()}


def prepare_output(out: Path, record: dict) -> None:
    """Create ``out`` (or check that it was made with ``record``) and write the record: an unwritable folder or a
    full disk fails here, before any image."""
    if out.exists() and not out.is_dir():
        raise WriteError(f"{out}: cannot write: a file is in the way of the output folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(out, error) from None
    previous = read_record(out / RUN_RECORD)
    if previous is not None and previous != record:
        old, new = previous.get("options", {}), record["options"]
        changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
        if previous.get("turbo") != record["turbo"]:
            changed.insert(0, f"turbo: {previous.get('turbo')} -> {record['turbo']} (another model)")
        raise DataSetError(
            f"out: {out} holds a set made otherwise ({'; '.join(changed) or 'another format'}); "
            "rerun with its options or choose another folder"
        )
    write_json(out / RUN_RECORD, record, indent=1)


def read_record(path: Path) -> dict | None:
    """A JSON record, or ``None`` when absent (records are written whole or not at all)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise DataSetError(f"{path}: unreadable record ({error}); delete it to regenerate that part") from None


def check_identity_record(record: dict, identity: Identity, path: Path) -> None:
    if record.get("description") != identity.description:
        raise DataSetError(
            f"{path}: made for {record.get('description')!r}, but the identity list now says "
            f"{identity.description!r} for {identity.folder}; use the same list or another folder"
        )


def write_results(out: Path, identities: list[Identity], shard: Shard) -> dict:
    """Rebuild the metadata and summary of ``identities`` (the shard's) from their records."""
    records = [read_record(out / identity.folder / IDENTITY_RECORD) for identity in identities]
    metadata = {
        relative: record["description"]
        for record in records
        if record is not None
        for relative in record["images"]
        if (out / relative).is_file()
    }
    summary = summarize(records)
    if shard.count == 1:
        write_json(out / METADATA, dict(sorted(metadata.items())), indent=1)
    else:
        shard_file = {
            "shard": [shard.index, shard.count], "complete": summary["identities_done"] == len(identities),
            "identities": [identity.folder for identity in identities], "metadata": dict(sorted(metadata.items())),
        }  # fmt: skip
        write_json(out / SHARDS / f"metadata-{shard.name}.json", shard_file, indent=1)
    write_json(out / (SUMMARY if shard.count == 1 else f"{SHARDS}/summary-{shard.name}.json"), summary, indent=1)
    return summary


def summarize(records: list[dict | None]) -> dict:
    done = [record for record in records if record is not None]
    kept = sum(len(record["images"]) for record in done)
    dropped = Counter(reason for record in done for reason in record["dropped"].values())
    faces = [record["faces"] for record in done if "faces" in record]
    summary = {
        "identities": len(records),
        "identities_done": len(done),
        "identities_kept": sum(1 for record in done if record["images"]),
        "images": kept,
        "dropped": dict(sorted(dropped.items())),
        "kept_share": round(kept / (kept + sum(dropped.values())), 4) if kept or dropped else None,
    }
    if faces:
        withins = [f["within"] for f in faces if f["within"] is not None]
        embeddings = [f["embedding"] for f in faces if f["embedding"]][:SIMILARITY_SAMPLE]
        summary["faces"] = {"backend": faces[0]["backend"], "photos_with_a_face": sum(f["detected"] for f in faces),
                            **similarity_report(withins, embeddings)}  # fmt: skip
    return summary


def merge_shards(out: str | Path) -> dict:
    """Join every shard's metadata into ``metadata.json`` (and the summary, recomputed from the identity records)
    once all N shards are complete; the result equals what one unsharded run writes."""
    out = Path(out)
    files = sorted((out / SHARDS).glob("metadata-*-of-*.json"))
    if not files:
        raise DataSetError(f"merge: {out / SHARDS} holds no shard metadata (metadata-I-of-N.json)")
    shards = {path: read_record(path) for path in files}
    counts = {tuple(shard["shard"])[1] for shard in shards.values()}
    if len(counts) != 1:
        raise DataSetError(f"merge: {out / SHARDS} mixes shard counts {sorted(counts)}; delete the stale files")
    count = counts.pop()
    found = {shard["shard"][0] for shard in shards.values()}
    missing = sorted(set(range(count)) - found)
    if missing:
        raise DataSetError(f"merge: shards {', '.join(f'{i}/{count}' for i in missing)} have not run yet")
    unfinished = [f"{s['shard'][0]}/{count}" for s in shards.values() if not s["complete"]]
    if unfinished:
        raise DataSetError(f"merge: shards {', '.join(unfinished)} are not complete; run them again to finish")
    metadata: dict[str, str] = {}
    folders: list[str] = []
    for path, shard in shards.items():
        overlap = metadata.keys() & shard["metadata"].keys()
        if overlap:
            raise DataSetError(f"merge: {path} lists {sorted(overlap)[0]} like an earlier shard")
        metadata.update(shard["metadata"])
        folders += shard["identities"]
    # Complete shards have every record; in list order they are what one unsharded run reads.
    records = sorted((read_record(out / folder / IDENTITY_RECORD) for folder in folders), key=lambda r: r["index"])
    summary = summarize(records)
    write_json(out / METADATA, dict(sorted(metadata.items())), indent=1)
    write_json(out / SUMMARY, summary, indent=1)
    return summary

