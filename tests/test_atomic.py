"""Atomic writes (issue 12): images, identities, model directories and checkpoints are written beside and renamed
into place, so a full disk or a kill leaves the old content, never a broken mix; write failures are one-line
WriteErrors naming the path. The disk-full and kill cases run in subprocesses under a small RLIMIT_FSIZE; each
imports only the code it puts to the test (the CLI, Identity, the model-directory writer)."""

import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lcmla_sdk import Identity, LcmlaError, Personalizer, WriteError, atomic, model_dir

from conftest import SAVE_RANDOM_MODEL, build_shallow_tiny, shallow_tiny_config

pytestmark = pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE and SIGKILL are POSIX")


def run_with_file_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """Run ``args`` where no file may grow beyond ``limit`` bytes: a write past it fails with EFBIG, as a write to a
    full disk fails with ENOSPC (SIGXFSZ, which would kill the process instead, is ignored)."""

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(args, preexec_fn=limit_files, capture_output=True, text=True, timeout=300)


def hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_full_disk_keeps_the_previous_image(shallow_tiny_dir, tmp_path):
    out = tmp_path / "out"
    # The previous image: any PNG at the path the CLI writes (noise, so that it does not fit under the limit).
    image = out / "000.png"
    out.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(image)
    before = image.read_bytes()
    assert len(before) > 4096
    # No face detection and the shallow tiny model (it loads in a quarter of the tiny preset's build time): what is
    # checked is how the image file is written.
    args = ["generate", "--model", str(shallow_tiny_dir), "--steps", "1", "--faces", "none", "--out", str(out)]

    run = run_with_file_limit(
        [sys.executable, "-m", "lcmla_sdk.cli", *args, "--prompt", "another face", "--seed", "2", "--device", "cpu",
         "--overwrite"], limit=4096,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"error: {image}: cannot write: File too large (the file size limit was reached)"
    assert "Traceback" not in run.stderr
    assert image.read_bytes() == before and Image.open(image).size == (128, 128)
    assert sorted(p.name for p in out.iterdir()) == ["000.png"]  # no temporary left behind


SAVE_IDENTITY = """
import sys
from lcmla_sdk.errors import WriteError
from lcmla_sdk.identity import Identity
identity = Identity.load(sys.argv[1])
identity.sources = ["a" * 64] * 100  # a larger header than the file being replaced
try:
    identity.save(sys.argv[1])
except WriteError as error:
    print(error)
"""


def test_a_full_disk_keeps_the_previous_identity(shallow_tiny, face, tmp_path):
    path = shallow_tiny.encode_face(face).save(tmp_path / "person.safetensors")
    before = path.read_bytes()
    run = run_with_file_limit([sys.executable, "-c", SAVE_IDENTITY, str(path)], limit=len(before) + 1024)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{path}: cannot write: File too large (the file size limit was reached)"
    assert path.read_bytes() == before
    assert shallow_tiny.load_identity(path).sources == shallow_tiny.encode_face(face).sources
    assert hidden(tmp_path) == []


@pytest.fixture(scope="module")
def other_model() -> Personalizer:
    """Another model than ``shallow_tiny_dir``'s (seed 1, not 0; only saved from), as the subprocesses save."""
    return build_shallow_tiny(seed=1)


@pytest.mark.parametrize("failure", ["disk full", "kill"])
def test_a_failed_or_killed_save_leaves_the_old_directory_whole(shallow_tiny_dir, other_model, tmp_path, failure):
    import shutil

    # The old directory: any model directory (the shallow tiny's copies and hashes in a fraction of the tiny's time).
    root = shutil.copytree(shallow_tiny_dir, tmp_path / "model")
    files = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    fingerprint = model_dir.validate(root).fingerprint()
    limit = 64 * 1024 if failure == "disk full" else resource.RLIM_INFINITY
    config = json.dumps(shallow_tiny_config())
    # What Personalizer.save_pretrained runs (SAVE_RANDOM_MODEL, conftest.py), without building the rest of a
    # Personalizer. What it saves does not matter, only how: the shallow tiny, seed 1 (other weights than root's).
    save = [sys.executable, "-c", SAVE_RANDOM_MODEL, str(root), config, "1", *(["kill"] if failure == "kill" else [])]
    run = run_with_file_limit(save, limit=limit)
    if failure == "disk full":
        assert run.returncode == 0 and run.stdout.strip() == f"{root}: cannot write: File too large (the file size limit was reached)"
        assert hidden(tmp_path) == []
    else:
        assert run.returncode == -signal.SIGKILL
        assert len(hidden(tmp_path)) == 1  # the killed writer's temporary
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} == files
    assert model_dir.validate(root).fingerprint() == fingerprint
    # The next save over the same place replaces it whole and clears what the killed writer left.
    resaved = other_model.save_pretrained(root)
    assert model_dir.validate(resaved).fingerprint() != fingerprint and hidden(tmp_path) == []


def test_saves_that_would_remove_other_files_are_refused(shallow_tiny_dir, tmp_path):
    import shutil

    root = shutil.copytree(shallow_tiny_dir, tmp_path / "model")  # any model directory
    model = Personalizer.from_pretrained(root, device="cpu")
    with pytest.raises(ValueError, match=f"^path: {root} holds {root / 'image_encoder'}, which a linked save names"):
        model.save_pretrained(root, link_frozen=True)
    assert model_dir.validate(root)
    # A save replaces its folder whole, so a folder of other files is never taken for one.
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(ValueError, match="photos is a folder with other files"):
        model.save_pretrained(tmp_path / "photos")
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"jpeg"


# ------------------------------------------------------------------ the helpers
def test_files_replace_whole_and_failures_leave_the_old_content(tmp_path):
    path = atomic.write_text(tmp_path / "a" / "note.txt", "old")
    assert path.read_text() == "old"
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("the writer failed")
    assert path.read_text() == "old" and hidden(path.parent) == []
    (tmp_path / "a" / "folder").mkdir()
    with pytest.raises(WriteError, match="folder: cannot write: a directory is in the way of a file") as error:
        atomic.write_text(tmp_path / "a" / "folder", "x")
    assert isinstance(error.value, OSError) and isinstance(error.value, LcmlaError)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename aside"])
def test_directories_are_swapped_in_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "dir"
    with atomic.atomic_directory(target) as staging:
        (staging / "old-only.txt").write_text("1")
        (staging / "both.txt").write_text("old")
    with pytest.raises(KeyError), atomic.atomic_directory(target) as staging:
        (staging / "both.txt").write_text("half")
        raise KeyError("failed while writing")
    assert sorted(p.name for p in target.iterdir()) == ["both.txt", "old-only.txt"] and hidden(tmp_path) == []
    with atomic.atomic_directory(target) as staging:
        (staging / "both.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["both.txt"] and (target / "both.txt").read_text() == "new"
    assert hidden(tmp_path) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(WriteError, match="a file is in the way of a directory"):
        with atomic.atomic_directory(tmp_path / "file"):
            pass


def test_leftovers_of_dead_writers_are_removed_not_those_of_live_ones(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".out.png.tmp-{pid}-00000000.png").write_bytes(b"partial")
    (tmp_path / f".out.png.tmp-{os.getpid()}-11111111.png").write_bytes(b"being written")
    (tmp_path / f".model.tmp-{pid}-22222222").mkdir()
    atomic.write_bytes(tmp_path / "out.png", b"png")
    with atomic.atomic_directory(tmp_path / "model"):
        pass
    assert hidden(tmp_path) == [f".out.png.tmp-{os.getpid()}-11111111.png"]


def test_identity_saves_name_the_path_on_failure(shallow_tiny, face, tmp_path):
    (tmp_path / "taken").mkdir()
    identity = shallow_tiny.encode_face(face)
    with pytest.raises(WriteError, match=f"^{tmp_path / 'taken'}: cannot write: a directory is in the way of a file$"):
        identity.save(tmp_path / "taken")
    assert isinstance(Identity.load(identity.save(tmp_path / "ok.safetensors")), Identity)
