"""``lcmla eval``: generate every face x prompt x seed x mode, then measure identity and prompt fidelity.

Metrics (docs/EVALUATION.md):

* **ID**: cosine between the face-recognition embedding of the input photo's face and of the largest face found in
  an output, per recognizer (``dlib``, ``insightface:DIR``). Outputs where a recognizer finds no face have no ID
  value; they are counted in its detection rate, never dropped silently.
* **CLIP-T**: 100 x cosine between the CLIP image embedding of an output and the CLIP text embedding of its prompt.
* **CLIP-I**: 100 x cosine between the CLIP image embeddings of an output and of the input photo.

An evaluation folder holds:

``run.json``                             what its images depend on (checked when a run continues)
``images/<face>/<mode>/pNN-sSEED.png``   the images; a run skips those already there
``scores.csv``                           one row per image
``summary.json``, ``table.md``           per mode: means, deviations, detection rates (``table.md``: the paper's format)
``sheets/<face>.png``                    one contact sheet per face: the input, then a row per prompt
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import evaluation_reports as reports
from .errors import InvalidImageError, ModelFilesError, NoFaceError
from .faces import FaceAnalyzer, FaceBackend
from .images import clip_pixels, load_rgb, pixel_sha256

# mode name -> generate()'s (mode, use_kv)
EVAL_MODES = {"quality": ("quality", True), "fast": ("fast", True), "nokv": ("quality", False)}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# What every image of a folder depends on besides its face, prompt, seed and mode; a continued run must match.
FROZEN = ("model", "prompts", "steps", "height", "width")


def default_prompts() -> list[str]:
    """The prompt list shipped with the package: photographic, stylised and material-change prompts."""
    return parse_prompts(resources.files("lcmla_sdk").joinpath("assets/eval_prompts.txt").read_text(), "default list")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts: no such file: {path}")
    return parse_prompts(path.read_text(encoding="utf-8"), str(path))


def parse_prompts(text: str, where: str) -> list[str]:
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompts: {where} holds no prompt")
    return prompts


def find_faces(folder: str | Path) -> dict[str, Path]:
    """The photos of ``folder`` by name (file name without suffix), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"faces: no such folder: {folder}")
    photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not photos:
        raise ValueError(f"faces: {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    names: dict[str, Path] = {}
    for photo in photos:
        if photo.stem in names:
            raise ValueError(f"faces: {names[photo.stem].name} and {photo.name} would share the name {photo.stem!r}")
        names[photo.stem] = photo
    return names


@dataclass(frozen=True)
class Job:
    """One image of an evaluation."""

    face: str
    mode: str
    prompt_index: int
    seed: int

    @property
    def path(self) -> Path:
        return Path("images") / self.face / self.mode / f"p{self.prompt_index:02d}-s{self.seed}.png"


@dataclass
class EvalPlan:
    """What to generate: every face x prompt x seed x mode; ``steps``/``height``/``width`` as in ``generate``."""

    faces: dict[str, Path]
    prompts: list[str]
    seeds: list[int]
    modes: list[str] = field(default_factory=lambda: list(EVAL_MODES))
    steps: int | None = None
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in EVAL_MODES]
        if unknown or not self.modes:
            raise ValueError(f"modes: {unknown or 'none'} given; expected some of {tuple(EVAL_MODES)}")
        if not self.seeds:
            raise ValueError("seeds: at least one seed is needed")
        if not self.faces or not self.prompts:
            raise ValueError("faces/prompts: at least one face and one prompt are needed")

    def jobs(self) -> list[Job]:
        """Face-major, then mode, prompt, seed: a face's images are finished before the next face starts."""
        return [
            Job(face, mode, index, seed)
            for face in self.faces for mode in self.modes for index in range(len(self.prompts)) for seed in self.seeds
        ]  # fmt: skip


def generate_images(
    personalizer,
    plan: EvalPlan,
    out: str | Path,
    on_image: Callable[[Job, bool], Any] | None = None,
) -> list[Job]:
    """Generate every image of ``plan`` into ``out`` with ``personalizer`` (a :class:`~lcmla_sdk.Personalizer`),
    skipping images already there; ``on_image(job, skipped)`` runs after each. Returns the jobs.

    Each face is encoded once (:meth:`~lcmla_sdk.Personalizer.encode_face`, which detects it), then
    ``generate(identity, prompt, seed=..., mode=..., use_kv=...)`` makes one image per call. Images are written to a
    temporary name and renamed, so an interrupted run never leaves a half-written image that a later run would keep.
    """
    out = Path(out)
    photos = {name: load_rgb(path) for name, path in plan.faces.items()}
    check_run_file(out, plan, personalizer.fingerprint, {name: pixel_sha256(p) for name, p in photos.items()})
    jobs, identities = plan.jobs(), {}
    for job in jobs:
        target = out / job.path
        if target.is_file():
            if on_image is not None:
                on_image(job, True)
            continue
        if job.face not in identities:
            identities[job.face] = personalizer.encode_face(photos[job.face])
        mode, use_kv = EVAL_MODES[job.mode]
        image = personalizer.generate(
            identities[job.face], plan.prompts[job.prompt_index], seed=job.seed, mode=mode, use_kv=use_kv,
            steps=plan.steps, height=plan.height, width=plan.width, output="pil",
        )[0]  # fmt: skip
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        image.save(partial, format="PNG")
        os.replace(partial, target)
        if on_image is not None:
            on_image(job, False)
    return jobs


def check_run_file(out: Path, plan: EvalPlan, fingerprint: str, face_hashes: dict[str, str]) -> None:
    """Write ``run.json``, or refuse to continue a folder whose images depend on other settings.

    Modes, seeds and faces may change between runs (they add or leave out images), as long as a face name keeps its
    picture (``face_hashes``: name -> pixel hash); the rest is :data:`FROZEN`.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} is a file, not a folder")
    settings = {
        "model": fingerprint, "prompts": plan.prompts, "faces": face_hashes, "steps": plan.steps,
        "height": plan.height, "width": plan.width, "modes": plan.modes, "seeds": plan.seeds,
    }  # fmt: skip
    run_file = out / "run.json"
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"out: {run_file} is not JSON ({error}); use another folder") from None
        changed = [key for key in FROZEN if previous.get(key) != settings[key]]
        old_faces = previous.get("faces", {})
        changed += [
            f"picture for face {name!r}" for name, digest in face_hashes.items() if old_faces.get(name, digest) != digest
        ]
        settings["faces"] = {**old_faces, **face_hashes}
        if changed:
            raise ValueError(
                f"out: {out} holds an evaluation with other {', '.join(changed)}; its images would not match these "
                f"settings: use another --out, or the same {', '.join(changed)}"
            )
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=2))


# ------------------------------------------------------------------------------------------------ metrics
class Recognizer:
    """A face backend used to measure identity: the embedding of the largest face in an image, if any."""

    def __init__(self, spec: str, label: str | None = None, providers: list[str] | None = None) -> None:
        backend = FaceBackend.parse(spec)
        if backend.kind not in ("dlib", "insightface"):
            raise ValueError(
                f"recognizer: {spec!r} is not a face backend; expected 'dlib[:options]' or 'insightface:DIR'"
            )
        self.analyzer: FaceAnalyzer = backend.open(providers)
        self.label = label or backend.kind

    def embed(self, image: Image.Image) -> np.ndarray | None:
        faces = self.analyzer.detect(image)
        return faces[0].embedding if faces else None


def id_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two face embeddings."""
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


class ClipScorer:
    """CLIP image and text embeddings from a local folder (transformers ``CLIPModel`` + its tokenizer), never a
    download. Images are preprocessed as ``CLIPImageProcessor`` does (:func:`~lcmla_sdk.images.clip_pixels`)."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.folder = Path(folder).expanduser()
        if not (self.folder / "config.json").is_file():
            raise ModelFilesError(f"clip: {self.folder} is not a CLIP model folder (no config.json)")
        try:
            self.model = CLIPModel.from_pretrained(self.folder, local_files_only=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelFilesError(f"clip: cannot load a CLIP model and tokenizer from {self.folder}: {error}") from None
        self.device = torch.device(device)
        self.size = self.model.config.vision_config.image_size

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(N, D)``, L2-normalised."""
        pixels = torch.cat([clip_pixels(image, self.size) for image in images]).to(self.device)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)``, L2-normalised; texts longer than CLIP's 77 tokens are truncated."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        pooled = self.model.text_model(
            input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
        ).pooler_output
        return torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)


def make_recognizers(specs: Sequence[str], providers: list[str] | None = None) -> list[Recognizer]:
    """One :class:`Recognizer` per spec, labelled by backend: ``dlib``, ``insightface``, or ``dlib-1``, ``dlib-2``, ...
    when one backend is given more than once."""
    kinds = [FaceBackend.parse(spec).kind for spec in specs]
    return [
        Recognizer(spec, kind if kinds.count(kind) == 1 else f"{kind}-{kinds[: i + 1].count(kind)}", providers)
        for i, (spec, kind) in enumerate(zip(specs, kinds))
    ]


def reference_embeddings(plan: EvalPlan, recognizers: Sequence[Recognizer]) -> dict[tuple[str, str], np.ndarray]:
    """``(recognizer label, face name) -> embedding`` of every input photo; :class:`NoFaceError` if one has none."""
    references = {}
    for name, path in plan.faces.items():
        photo = load_rgb(path)
        for recognizer in recognizers:
            embedding = recognizer.embed(photo)
            if embedding is None:
                raise NoFaceError(f"faces: {recognizer.analyzer.name} finds no face in the input photo {path}")
            references[recognizer.label, name] = embedding
    return references


def score_images(
    plan: EvalPlan,
    out: str | Path,
    jobs: Sequence[Job],
    recognizers: Sequence[Recognizer],
    references: dict[tuple[str, str], np.ndarray],
    clip: ClipScorer | None,
) -> list[dict[str, Any]]:
    """One row per image: its job, ``id/<label>`` (``None`` where no face was found) and ``face/<label>`` (1/0) per
    recognizer, ``clip_t`` and ``clip_i`` (``None`` without CLIP)."""
    out = Path(out)
    if clip is not None:
        photos = {name: load_rgb(path) for name, path in plan.faces.items()}
        texts = dict(zip(plan.prompts, clip.text_embeddings(plan.prompts)))
        inputs = dict(zip(photos, clip.image_embeddings(list(photos.values()))))
    rows = []
    for job in jobs:
        image = read_output(out / job.path)
        prompt = plan.prompts[job.prompt_index]
        row: dict[str, Any] = {
            "face": job.face, "mode": job.mode, "prompt_index": job.prompt_index, "prompt": prompt, "seed": job.seed,
            "file": job.path.as_posix(),
        }  # fmt: skip
        for recognizer in recognizers:
            embedding = recognizer.embed(image)
            found = embedding is not None
            row[f"face/{recognizer.label}"] = int(found)
            reference = references[recognizer.label, job.face]
            row[f"id/{recognizer.label}"] = id_similarity(reference, embedding) if found else None
        if clip is not None:
            embedding = clip.image_embeddings([image])[0]
            row["clip_t"] = 100.0 * float(embedding @ texts[prompt])
            row["clip_i"] = 100.0 * float(embedding @ inputs[job.face])
        else:
            row["clip_t"] = row["clip_i"] = None
        rows.append(row)
    return rows


def read_output(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise InvalidImageError(f"out: cannot read the generated image {path}: {error}") from None


def summarise(rows: Sequence[dict[str, Any]], modes: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Per mode: the number of images; per recognizer the mean and standard deviation of ID over the images where it
    found a face, and the detection rate; CLIP-T and CLIP-I means and deviations."""

    def stats(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"mean": None, "std": None}
        return {"mean": float(np.mean(values)), "std": float(np.std(values))}

    summary = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        entry: dict[str, Any] = {"images": len(mine), "id": {}}
        for label in labels:
            found = [r[f"id/{label}"] for r in mine if r[f"face/{label}"]]
            entry["id"][label] = {
                **stats(found), "faces_found": len(found),
                "detection_rate": len(found) / len(mine) if mine else None,
            }  # fmt: skip
        for metric in ("clip_t", "clip_i"):
            entry[metric] = stats([r[metric] for r in mine if r[metric] is not None])
        summary[mode] = entry
    return summary


def evaluate(
    personalizer,
    plan: EvalPlan,
    out: str | Path,
    method: str,
    recognizers: Sequence[Recognizer],
    clip: ClipScorer | None = None,
    on_image: Callable[[Job, bool], Any] | None = None,
    log: Callable[[str], Any] = lambda message: None,
    references: dict[tuple[str, str], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Generate (resumable), score, and write ``scores.csv``, ``summary.json``, ``table.md`` and ``sheets/`` into
    ``out``. ``method`` names the table's rows; ``references``: :func:`reference_embeddings`, if already computed.
    Returns the summary."""
    if not recognizers:
        raise ValueError("recognizer: at least one face recognizer is needed to measure identity")
    out = Path(out)
    if references is None:  # an input without a face fails before any generation
        references = reference_embeddings(plan, recognizers)
    jobs = generate_images(personalizer, plan, out, on_image)
    log(f"scoring {len(jobs)} images: {', '.join(r.analyzer.name for r in recognizers)}" + (", CLIP" if clip else ""))
    rows = score_images(plan, out, jobs, recognizers, references, clip)
    labels = [r.label for r in recognizers]
    summary = {
        "method": method,
        "model_fingerprint": personalizer.fingerprint,
        "recognizers": {r.label: r.analyzer.name for r in recognizers},
        "clip": str(clip.folder) if clip is not None else None,
        "settings": {
            "faces": {name: str(path) for name, path in plan.faces.items()}, "prompts": plan.prompts,
            "seeds": plan.seeds, "modes": plan.modes, "steps": plan.steps, "height": plan.height, "width": plan.width,
        },
        "modes": summarise(rows, plan.modes, labels),
    }  # fmt: skip
    reports.write_csv(rows, out / "scores.csv")
    reports.write_json(summary, out / "summary.json")
    (out / "table.md").write_text(reports.markdown_table(method, summary["modes"], labels, clip is not None))
    (out / "sheets").mkdir(exist_ok=True)
    titles = [f"{mode}\nseed {seed}" for mode in plan.modes for seed in plan.seeds]
    for name, path in plan.faces.items():
        grid = [
            [read_output(out / Job(name, mode, index, seed).path) for mode in plan.modes for seed in plan.seeds]
            for index in range(len(plan.prompts))
        ]
        reports.contact_sheet(load_rgb(path), grid, plan.prompts, titles).save(out / "sheets" / f"{name}.png")
    log(f"wrote {out / 'scores.csv'}, summary.json, table.md and {len(plan.faces)} contact sheet(s) in sheets/")
    return summary
