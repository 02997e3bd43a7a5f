"""Integrity (issue 12): recorded hashes are checked when files are loaded, cheaply (one cached sha256 helper), and
every manifest is checked against its schema with errors naming the field."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from lcmla_sdk import IntegrityError, ModelFilesError, Personalizer, integrity, model_dir

def settle(*paths) -> int:
    """Date files an hour back (as if written long ago: their hashes may be cached); return that mtime."""
    past = time.time_ns() - 3600 * 10**9
    for path in paths:
        os.utime(path, ns=(past, past))
    return past


@pytest.fixture
def model_copy(tiny_dir, tmp_path):
    """A private copy of the session's model directory, settled."""
    root = shutil.copytree(tiny_dir, tmp_path / "model")
    settle(*root.rglob("*"))
    return root


def corrupt_in_place(path):
    """Flip one byte near the end (inside the tensor data), keeping the size."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_file_corrupted_in_place_is_refused_naming_both_hashes(model_copy, dir_model):
    unet_file = model_copy / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"
    recorded = json.loads((model_copy / "lcmla.json").read_text())["files"]["sdxl/unet/diffusion_pytorch_model.safetensors"]
    size = unet_file.stat().st_size
    corrupt_in_place(unet_file)
    assert unet_file.stat().st_size == size
    found = hashlib.sha256(unet_file.read_bytes()).hexdigest()
    with pytest.raises(IntegrityError) as error:
        Personalizer.from_pretrained(model_copy, device="cpu")
    assert str(error.value).startswith(
        f"{unet_file}: sha256 {found} does not match {recorded['sha256']} recorded in {model_copy / 'lcmla.json'}"
    )
    assert isinstance(error.value, ModelFilesError) and "\n" not in str(error.value)
    # verify=False trusts the manifest: the directory loads, under the fingerprint its records give.
    assert Personalizer.from_pretrained(model_copy, device="cpu", verify=False).fingerprint == dir_model.fingerprint


def count_hashing(monkeypatch) -> list:
    """Files read for hashing by lcmla's one sha256 helper."""
    read, real_open = [], open

    def spy(path, *args, **kwargs):
        read.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(integrity, "open", spy, raising=False)
    return read


def test_a_directory_is_hashed_once_not_on_every_load(model_copy, monkeypatch):
    read = count_hashing(monkeypatch)
    first = model_dir.validate(model_copy).fingerprint()
    weights = [p for p in read if p.endswith(".safetensors")]
    assert len(weights) >= 8  # every recorded weight file was verified
    read.clear()
    assert model_dir.validate(model_copy).fingerprint() == first
    assert read == []  # nothing read again: size, mtime and inode are unchanged
    corrupt_in_place(model_copy / "adapter" / "ip_kv.safetensors")  # a new mtime: hashed again, and refused
    with pytest.raises(IntegrityError, match="ip_kv.safetensors: sha256"):
        model_dir.validate(model_copy)
    assert [os.path.basename(p) for p in read] == ["ip_kv.safetensors"]


def test_hashes_follow_files_through_a_rename(tmp_path, monkeypatch):
    """Directories are written beside their place and renamed in: the cache keys files by device and inode, so the
    hashes made while saving still serve after the swap."""
    written = tmp_path / ".model.tmp" / "weights.bin"
    written.parent.mkdir()
    written.write_bytes(b"w" * 1000)
    settle(written)
    expected = integrity.sha256_file(written)
    (tmp_path / ".model.tmp").rename(tmp_path / "model")
    read = count_hashing(monkeypatch)
    assert integrity.sha256_file(tmp_path / "model" / "weights.bin") == expected and read == []


READ_HASH = "import sys; from lcmla_sdk.integrity import sha256_file; print(sha256_file(sys.argv[1]))"


def test_the_cache_persists_across_processes_and_skips_files_still_settling(tmp_path):
    env = {**os.environ, "LCMLA_CACHE_DIR": str(tmp_path / "cache")}
    big = tmp_path / "big.bin"
    big.write_bytes(b"a" * integrity.CACHE_MIN_BYTES)
    past = settle(big)

    def hashed() -> str:
        run = subprocess.run([sys.executable, "-c", READ_HASH, str(big)], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    original = hashed()
    assert original == hashlib.sha256(big.read_bytes()).hexdigest()
    entries = json.loads((tmp_path / "cache" / "sha256.json").read_text())["entries"]
    assert list(entries.values()) == [[big.stat().st_size, past, original]]
    # Rewritten with its size and mtime restored by hand: another process answers from the cache without reading,
    # which is the cache's stated limit.
    big.write_bytes(b"b" * integrity.CACHE_MIN_BYTES)
    os.utime(big, ns=(past, past))
    assert hashed() == original
    os.utime(big)  # any real write moves the mtime: hashed again
    assert hashed() == hashlib.sha256(big.read_bytes()).hexdigest()

    # A file modified within RACY_NS before hashing is not cached: a second write in the same timestamp tick
    # could keep its mtime.
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"x" * 10)
    stamp = fresh.stat().st_mtime_ns
    assert integrity.sha256_file(fresh) == hashlib.sha256(b"x" * 10).hexdigest()
    fresh.write_bytes(b"y" * 10)
    os.utime(fresh, ns=(stamp, stamp))
    assert integrity.sha256_file(fresh) == hashlib.sha256(b"y" * 10).hexdigest()


def test_one_sha256_helper_for_the_project():
    from lcmla_sdk import manifest
    from lcmla_sdk.engines.building import sha256_file as engines_hash
    from lcmla_sdk.export.exporting import sha256_file as export_hash

    assert model_dir.format.sha256_file is model_dir.saving.sha256_file is integrity.sha256_file is engines_hash is export_hash
    assert not hasattr(manifest, "sha256_file")


# ------------------------------------------------------------------ tokenizer files and configs
@pytest.mark.parametrize(
    "name, data, message",
    [("tokenizer.json", b"{not json", "tokenizer.json: invalid JSON"),
     ("tokenizer.json", b"\xff\xfe\x00", "tokenizer.json: invalid JSON: 'utf-8' codec can't decode"),
     ("tokenizer_config.json", b"[1, 2]", "tokenizer_config.json: expected a JSON object, got list"),
     ("merges.txt", b"\xff\xfe\x00", "merges.txt: not UTF-8 text"),
     ("tokenizer.json", b"{}", "sdxl/tokenizer_2: unusable CLIP tokenizer files")],
)  # fmt: skip
def test_malformed_tokenizer_files_are_named(model_copy, name, data, message):
    (model_copy / "sdxl" / "tokenizer_2" / name).write_bytes(data)
    with pytest.raises(ModelFilesError) as error:
        Personalizer.from_pretrained(model_copy, device="cpu", verify=False)
    assert message in str(error.value) and "\n" not in str(error.value)
