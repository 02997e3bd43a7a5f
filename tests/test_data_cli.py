"""lcmla data end to end on the tiny Turbo preset: generate, resume, shards and merge, one-line errors, and
`lcmla train` on the result with no conversion. (Tiny weights make noise: no face is found in these images.)"""

import json
import os
import resource
import signal

import pytest
import yaml
from typer.testing import CliRunner

from lcmla_sdk.cli import app
from lcmla_sdk.data import load_turbo

SET = ["--turbo", "tiny", "--identities", "2", "--size", "64", "--per-identity", "2", "--per-style", "1",
       "--styles", "oil", "--batch-size", "4"]  # fmt: skip
runner = CliRunner()


def generate(out, *extra):
    return runner.invoke(app, ["data", "generate", *SET, "--out", str(out), *extra])


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def data_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("set")
    result = generate(out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_the_set_has_the_authors_layout_metadata_and_a_summary(data_set):
    out, output = data_set
    metadata = json.loads((out / "metadata.json").read_text())
    assert sorted(metadata) == sorted(files(out)) and len(metadata) == 6
    records = [json.loads((out / f"identity_000000{i}/identity.json").read_text()) for i in range(2)]
    for record in records:
        assert {metadata[path] for path in record["images"]} == {record["description"]}
        assert sum("/vanilla/A_photo_of_conceptname_" in p for p in record["images"]) == 2
        assert sum("/stylized/An_oil_painting_of_conceptname_" in p for p in record["images"]) == 1
        assert all(path.endswith(f"_{seed}.jpg") for path, seed in record["images"].items())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["identities_done"] == 2 and summary["images"] == 6 and summary["dropped"] == {}
    assert "identities: 2 of 2 done, 2 kept; images: 6" in output and "this run: 6 images" in output


def test_a_second_run_skips_what_is_done_and_completes_what_was_cut_off(data_set, tmp_path):
    out, _ = data_set
    before = files(out)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path, data in before.items():
        (copy / path).parent.mkdir(parents=True, exist_ok=True)
        (copy / path).write_bytes(data)
    for name in ("lcmla_data.json", "identity_0000000/identity.json"):
        (copy / name).write_bytes((out / name).read_bytes())
    # As a kill leaves it: identity 1 without its record and one image, a temporary of a dead writer.
    cut = sorted(p for p in before if p.startswith("identity_0000001/vanilla"))[0]
    (copy / cut).unlink()
    (copy / cut).with_name(f".{(copy / cut).name}.tmp-999999-ab.jpg").write_bytes(b"partial")
    resumed = generate(copy)
    assert resumed.exit_code == 0, resumed.output
    assert "this run: 1 images" in resumed.output
    assert files(copy) == before  # the same bytes as the uninterrupted run
    assert (copy / "metadata.json").read_text() == (out / "metadata.json").read_text()
    assert not list(copy.rglob(".*tmp-*"))
    again = generate(copy)
    assert again.exit_code == 0 and "this run: 0 images" in again.output


def test_shards_merge_exactly_into_the_unsharded_set(data_set, tmp_path):
    out, _ = data_set
    sharded = tmp_path / "sharded"
    assert generate(sharded, "--shard", "0/2").exit_code == 0
    early = runner.invoke(app, ["data", "merge", str(sharded)])
    assert early.exit_code == 2 and early.stderr.strip() == "error: merge: shards 1/2 have not run yet", early.output
    assert generate(sharded, "--shard", "1/2").exit_code == 0
    merged = runner.invoke(app, ["data", "merge", str(sharded)])
    assert merged.exit_code == 0, merged.output
    for name in ("metadata.json", "summary.json"):
        assert (sharded / name).read_text() == (out / name).read_text()
    assert files(sharded) == files(out)


def test_a_local_diffusers_folder_gives_the_presets_images(data_set, tmp_path):
    out, _ = data_set
    folder = tmp_path / "turbo"
    load_turbo("tiny").save_pretrained(folder)
    made = runner.invoke(app, ["data", "generate", *SET[2:], "--turbo", str(folder), "--out", str(tmp_path / "o")])
    assert made.exit_code == 0, made.output
    assert files(tmp_path / "o") == files(out)


def test_consistent_modes_run_and_the_filter_reports_why_it_drops(tmp_path):
    result = generate(tmp_path / "f", "--consistent", "attention,filter", "--faces", "dlib")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "f/summary.json").read_text())
    # Tiny weights draw noise: no face is found, so the filter keeps nothing, and says why.
    assert summary["dropped"] == {"no face detected": 4, "identity has fewer than 2 agreeing photos": 2}
    assert summary["kept_share"] == 0.0 and summary["faces"]["photos_with_a_face"] == 0
    assert json.loads((tmp_path / "f/metadata.json").read_text()) == {} and not list((tmp_path / "f").rglob("*.jpg"))
    assert "dropped: 4 no face detected" in result.output


def one_line_error(result, start):
    """The error is one line, the last on stderr (a progress bar may stand above it), and no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(start) and sum("error" in line for line in lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[-1]


def test_one_line_errors_for_the_model_folder_the_output_and_a_full_disk(data_set, tmp_path):
    out, _ = data_set
    base = ["data", "generate", *SET[2:], "--out", str(tmp_path / "o")]
    one_line_error(runner.invoke(app, [*base, "--turbo", str(tmp_path / "nope")]), f"error: turbo: {tmp_path / 'nope'}: no such folder")
    wrong = tmp_path / "sd15"
    wrong.mkdir()
    (wrong / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    one_line_error(runner.invoke(app, [*base, "--turbo", str(wrong)]), f"error: turbo: {wrong} holds a StableDiffusionPipeline")
    (tmp_path / "file").write_text("x")
    one_line_error(generate(tmp_path / "file" / "sub"), f"error: {tmp_path / 'file' / 'sub'}: cannot write:")
    line = one_line_error(generate(out, "--per-style", "2"), f"error: out: {out} holds a set made otherwise (per_style: 1 -> 2)")
    assert "rerun with its options" in line

    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))  # files may not grow past 2 kB: a full disk for images
    try:
        full = generate(tmp_path / "full")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    line = one_line_error(full, f"error: {tmp_path / 'full'}/identity_000000")
    assert line.endswith("cannot write: File too large (the file size limit was reached)")
    assert not list((tmp_path / "full").rglob("*.jpg")) and not list((tmp_path / "full").rglob(".*tmp-*"))


def test_lcmla_train_trains_on_the_set_as_it_is_and_resumes(data_set, shallow_tiny_dir, loss_weights, tmp_path):
    out, _ = data_set
    config = {  # the shallow tiny model's directory: what is checked is the data set's use, not the model
        "output_dir": str(tmp_path / "run"), "model": str(shallow_tiny_dir), "tiny_vae": loss_weights["tiny_vae"],
        "arcface": {"weights": loss_weights["arcface__weights"]}, "mixed_precision": "no", "batch_size": 1,
        "gradient_checkpointing": False, "data": {"sets": [{"root": str(out)}], "resolution": 64, "num_workers": 0},
        "faces": {"landmarks": "template"}, "logging": {"tracker": None}, "lookahead": {"batch_size": 1},
    }  # fmt: skip
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    first = runner.invoke(app, ["train", "--config", str(path), "max_steps=1", "checkpoint.every=1"])
    assert first.exit_code == 0, first.output
    summary = json.loads((tmp_path / "run/data_summary.json").read_text())
    assert summary["identities"] == 2 and summary["usable_targets"] == 6
    second = runner.invoke(app, ["train", "--config", str(path), "max_steps=2", "checkpoint.every=1", "--resume"])
    assert second.exit_code == 0, second.output
    assert "trained to step 2" in second.output
    state = json.loads((tmp_path / "run/checkpoints/step-0000002/trainer_state/state.json").read_text())
    assert state["step"] == 2
