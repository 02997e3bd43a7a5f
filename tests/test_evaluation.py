"""`lcmla eval`: metrics against hand computations, the contact-sheet grid, and a resumable run on the tiny preset."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import CLIPConfig, CLIPModel
from typer.testing import CliRunner

from lcmla_sdk import NoFaceError, Personalizer
from lcmla_sdk.cli import app
from lcmla_sdk.evaluation import (
    ClipScorer,
    EvalPlan,
    Job,
    Recognizer,
    check_run_file,
    default_prompts,
    read_prompts,
    reference_embeddings,
    score_images,
    summarise,
)
from lcmla_sdk.evaluation_reports import contact_sheet, markdown_table, thumbnail
from lcmla_sdk.images import clip_pixels, load_rgb
from lcmla_sdk.presets import preset_config, tiny_tokenizer

pytest.importorskip("dlib", reason="identity similarity uses the dlib backend ([faces] extra)")
skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def photos(tmp_path_factory, face, astronaut):
    folder = tmp_path_factory.mktemp("faces")
    face.save(folder / "sample.jpg")
    Image.fromarray(astronaut).resize((256, 256)).save(folder / "astronaut.png")
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIP with the tiny preset's text and vision widths, saved as a local folder with the tiny tokenizer."""
    config = preset_config("tiny")
    vision = {**config["image_encoder"], "image_size": 32, "patch_size": 8}
    clip_config = CLIPConfig(text_config=config["text_encoder"], vision_config=vision, projection_dim=32)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(clip_config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_clip_t_and_clip_i_equal_a_hand_computation(tiny_clip, face, astronaut):
    scorer = ClipScorer(tiny_clip)
    prompts = ["an oil painting of a face", "a face"]  # different lengths: padding must not change a prompt's score
    image, other = face, Image.fromarray(astronaut)
    clip_t = 100 * (scorer.image_embeddings([image]) @ scorer.text_embeddings(prompts).T)[0]
    clip_i = 100 * float(scorer.image_embeddings([image])[0] @ scorer.image_embeddings([other])[0])

    model, tokenizer = CLIPModel.from_pretrained(tiny_clip).eval(), tiny_tokenizer()
    with torch.no_grad():
        pixels = torch.cat([clip_pixels(image, 32), clip_pixels(other, 32)])
        for index, prompt in enumerate(prompts):  # CLIPModel's own forward, one unpadded prompt at a time
            output = model(input_ids=tokenizer(prompt, return_tensors="pt").input_ids, pixel_values=pixels)
            image_embeds, text_embeds = output.image_embeds.numpy(), output.text_embeds.numpy()
            a, t = image_embeds[0], text_embeds[0]
            expected = 100 * float(a @ t / (np.linalg.norm(a) * np.linalg.norm(t)))
            assert float(clip_t[index]) == pytest.approx(expected, abs=1e-4)
        b = image_embeds[1]
        assert clip_i == pytest.approx(100 * float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), abs=1e-4)


def test_id_similarity_detection_rate_and_table(tmp_path, photos):
    """Outputs placed by hand: the input photo itself (ID 1), its mirror image, and a photo with no face."""
    plan = EvalPlan(faces={"sample": photos / "sample.jpg"}, prompts=["p"], seeds=[0, 1, 2], modes=["quality"])
    jobs = plan.jobs()
    same = load_rgb(photos / "sample.jpg")  # the decoded input pixels, written losslessly
    outputs = [same, ImageOps.mirror(same), Image.fromarray(skimage_data.coffee())]
    for job, image in zip(jobs, outputs):
        (tmp_path / job.path).parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / job.path)
    recognizers = [Recognizer("dlib")]
    rows = score_images(plan, tmp_path, jobs, recognizers, reference_embeddings(plan, recognizers), None)
    ids = [row["id/dlib"] for row in rows]
    assert ids[0] == pytest.approx(1.0, abs=1e-5) and 0.97 < ids[1] < 1.0 and ids[2] is None
    assert [row["face/dlib"] for row in rows] == [1, 1, 0]
    summary = summarise(rows, plan.modes, ["dlib"])["quality"]
    assert summary["images"] == 3 and summary["id"]["dlib"]["faces_found"] == 2
    assert summary["id"]["dlib"]["detection_rate"] == pytest.approx(2 / 3)
    assert summary["id"]["dlib"]["mean"] == pytest.approx((ids[0] + ids[1]) / 2)  # misses are not averaged in
    table = markdown_table("ours", {"quality": summary}, ["dlib"], with_clip=False).splitlines()
    assert table[0] == "| Method | Mode | ID (dlib) ↑ | Face found (dlib) | Images |"
    assert table[2] == f"| ours | quality | {summary['id']['dlib']['mean']:.3f} | 2/3 (67%) | 3 |"


def test_contact_sheet_grid(face):
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    rows = [[Image.new("RGB", (64, 64), c) for c in row] for row in colours]
    titles = ["quality\nseed 0", "fast\nseed 0", "nokv\nseed 0"]
    sheet = contact_sheet(face, rows, ["prompt one", "prompt two"], titles, cell=48)
    assert sheet.size == (4 * 48, 3 * 48)  # (input + 3 columns) x (input row + 2 prompts)
    np.testing.assert_array_equal(np.asarray(sheet.crop((0, 0, 48, 48))), np.asarray(thumbnail(face, 48)))
    for r, row in enumerate(colours, start=1):
        for c, colour in enumerate(row, start=1):
            cell = np.asarray(sheet.crop((c * 48, r * 48, (c + 1) * 48, (r + 1) * 48)))
            assert (cell == colour).all(), (r, c)
        text_cell = np.asarray(sheet.crop((0, r * 48, 48, (r + 1) * 48)))
        assert (text_cell < 128).any() and (text_cell == 255).mean() > 0.5  # the prompt, written on white


def test_eval_on_tiny_writes_every_file_and_resumes_after_an_interruption(
    tmp_path, photos, monkeypatch, tiny_clip, astronaut_pack
):
    """Two recognizers: dlib, and the synthetic insightface pack, whose detector reports a face in every image."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\nA photo of a face\n\nAn oil painting of a face\n")
    out = tmp_path / "eval"
    args = ["eval", "--model", "tiny", "--faces", str(photos), "--prompts", str(prompts), "--out", str(out),
            "--steps", "1", "--height", "64", "--width", "64", "--device", "cpu", "--clip", str(tiny_clip),
            "--recognizer", "dlib", "--recognizer", f"insightface:{astronaut_pack}"]  # fmt: skip
    calls, original = [], Personalizer.generate

    def interrupted_after_five(self, *a, **k):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append((a[1], k["seed"], k["mode"], k["use_kv"]))
        return original(self, *a, **k)

    monkeypatch.setattr(Personalizer, "generate", interrupted_after_five)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130 and "run the same command again" in result.output
    kept = sorted(out.glob("images/*/*/*.png"))
    assert len(kept) == 5 and not list(out.glob("images/**/*.partial")) and not (out / "scores.csv").exists()
    before = {p: p.read_bytes() for p in kept}

    calls.clear()
    monkeypatch.setattr(Personalizer, "generate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(calls) == 2 * 2 * 3 - 5  # faces x prompts x modes, minus the five kept
    assert all(p.read_bytes() == data for p, data in before.items())
    assert {p.name for p in out.iterdir()} == {"run.json", "images", "scores.csv", "summary.json", "table.md", "sheets"}
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and {r["mode"] for r in rows} == {"quality", "fast", "nokv"}
    assert all((out / r["file"]).is_file() for r in rows)
    assert all(r["face/dlib"] == "0" and r["id/dlib"] == "" for r in rows)  # the tiny preset makes noise: no face
    assert all(r["face/insightface"] == "1" and -1 <= float(r["id/insightface"]) <= 1 for r in rows)
    assert all(-100 <= float(r["clip_t"]) <= 100 and -100 <= float(r["clip_i"]) <= 100 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "tiny" and summary["clip"] == str(tiny_clip)
    assert summary["recognizers"] == {"dlib": "dlib:hog,5", "insightface": f"insightface:{astronaut_pack.resolve()}"}
    for mode in ("quality", "fast", "nokv"):
        entry = summary["modes"][mode]
        assert entry["images"] == 4 and entry["id"]["dlib"] == {**entry["id"]["dlib"], "detection_rate": 0, "mean": None}
        assert entry["id"]["insightface"]["detection_rate"] == 1
        clip_t = [float(r["clip_t"]) for r in rows if r["mode"] == mode]
        assert entry["clip_t"]["mean"] == pytest.approx(np.mean(clip_t))
    table = (out / "table.md").read_text()
    assert table.splitlines()[0] == (
        "| Method | Mode | ID (dlib) ↑ | Face found (dlib) | ID (insightface) ↑ | Face found (insightface) "
        "| CLIP-T ↑ | CLIP-I | Images |"
    )
    assert "| tiny | nokv | n/a | 0/4 (0%) | " in table and " | 4/4 (100%) | " in table
    assert result.stdout == table
    for name in ("sample", "astronaut"):
        assert Image.open(out / "sheets" / f"{name}.png").size == ((1 + 3) * 192, (1 + 2) * 192)


def test_a_folder_of_other_settings_is_refused(tmp_path, photos):
    plan = EvalPlan(faces={"sample": photos / "sample.jpg"}, prompts=["a"], seeds=[0], steps=2)
    check_run_file(tmp_path, plan, "model-a", {"sample": "hash"})
    plan.seeds, plan.modes = [0, 1], ["fast"]  # seeds, modes and faces may change
    check_run_file(tmp_path, plan, "model-a", {"other": "hash2"})
    assert json.loads((tmp_path / "run.json").read_text())["faces"] == {"sample": "hash", "other": "hash2"}
    plan.steps = 4
    with pytest.raises(ValueError, match=r"^out: .* holds an evaluation with other model, steps, picture for face 'sample'"):
        check_run_file(tmp_path, plan, "model-b", {"sample": "another picture"})


def test_an_input_without_a_face_fails_before_generating(tmp_path, photos):
    faces = tmp_path / "faces"
    faces.mkdir()
    Image.fromarray(skimage_data.coffee()).save(faces / "coffee.png")
    result = CliRunner().invoke(app, ["eval", "--faces", str(faces), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: faces: dlib:hog,5 finds no face in the input photo {faces / 'coffee.png'}"
    assert not (tmp_path / "out").exists()
    with pytest.raises(NoFaceError):
        reference_embeddings(EvalPlan({"coffee": faces / "coffee.png"}, ["a"], [0]), [Recognizer("dlib")])


def test_prompt_lists_and_bad_arguments(tmp_path):
    shipped = default_prompts()
    assert len(shipped) >= 12 and not any(p.startswith("#") for p in shipped)
    assert {"A photo of a face", "An oil painting of a face", "A marble statue of a face"} <= set(shipped)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="^prompts: .*empty.txt holds no prompt"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match=r"^modes: \['turbo'\]"):
        EvalPlan({"a": tmp_path}, ["p"], [0], modes=["quality", "turbo"])
    with pytest.raises(ValueError, match="^recognizer: 'none' is not a face backend"):
        Recognizer("none")
    assert Job("sample", "fast", 3, 7).path.as_posix() == "images/sample/fast/p03-s7.png"
