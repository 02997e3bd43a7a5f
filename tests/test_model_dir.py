"""lcmla model directories: ``save_pretrained`` -> ``from_pretrained`` round trip, validation before any heavy load,
and the error of every bad directory (issue 3). Apart from the tiny preset's round trip, what is checked does not
depend on the UNet's depth: those tests save and load the shallow tiny model (conftest.py; its directory is a third of
the tiny preset's size and loads in a fraction of the time), and corruption cases work on copies of its directory."""

import json
import os
import re
import shutil
import subprocess
import sys
from itertools import chain
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from conftest import SAVE_RANDOM_MODEL, build_shallow_tiny, shallow_tiny_config
from lcmla_sdk import IntegrityError, ModelFilesError, Personalizer, model_dir

MODULES = ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder", "resampler")


@pytest.fixture(scope="module")
def reloaded(shallow_tiny_dir) -> Personalizer:
    """``shallow_tiny_dir`` loaded once, only read."""
    return Personalizer.from_pretrained(shallow_tiny_dir, device="cpu")


@pytest.fixture
def model_copy(shallow_tiny_dir, tmp_path):
    """A private copy of the session's model directory, free to damage."""
    return shutil.copytree(shallow_tiny_dir, tmp_path / "model")


def edit_manifest(root, change) -> None:
    manifest = json.loads((root / "lcmla.json").read_text())
    change(manifest)
    (root / "lcmla.json").write_text(json.dumps(manifest))


def rewrite(path, change, metadata=None) -> dict:
    """Replace a safetensors file by ``change(its tensors)``; return the new tensors."""
    state = change(load_file(path))
    save_file(state, path, metadata)
    return state


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, persistent or not."""
    return dict(chain(module.named_parameters(), module.named_buffers()))


# ------------------------------------------------------------------ round trip
def test_round_trip_is_bit_exact(tiny, dir_model):
    for name in MODULES:
        source, loaded = tensors(getattr(tiny.components, name)), tensors(getattr(dir_model.components, name))
        assert source.keys() == loaded.keys(), name
        different = [k for k in source if source[k].dtype != loaded[k].dtype or not torch.equal(source[k], loaded[k])]
        assert not different, f"{name}: {different[:5]}"
    # The UNet's comparison covered LCM-Lookahead's own weights, not just SDXL's.
    unet_keys = list(tensors(dir_model.components.unet))
    for part in ("lora_A.kv_encoder", "lora_B.lcm", "processor.to_k_ip", "processor.to_v_kv"):
        assert any(part in key for key in unet_keys), part
    for part in ("scheduler", "resampler", "kv_encoder"):
        assert dir_model.config[part] == tiny.config[part], part
    assert (dir_model.encoder_prompt, dir_model.face_size) == (tiny.encoder_prompt, tiny.face_size)
    for source, loaded in zip(tiny.tokenizers, dir_model.tokenizers):
        assert loaded("An oil painting of a face").input_ids == source("An oil painting of a face").input_ids


def test_round_trip_generates_the_same_images(tiny, dir_model, face):
    for kwargs in ({"mode": "quality", "steps": 1}, {"mode": "fast", "steps": 1}):
        source = tiny.generate(face, "a face", seed=3, output="pt", **kwargs)
        assert torch.equal(dir_model.generate(face, "a face", seed=3, output="pt", **kwargs), source), kwargs


def test_fingerprint_is_the_directory_content_not_its_place(reloaded, model_copy):
    fingerprint = model_dir.validate(model_copy).fingerprint()
    assert fingerprint == reloaded.fingerprint  # the same files elsewhere (reloaded: from shallow_tiny_dir)
    # Other weights, recorded in the manifest as `save_pretrained` and `convert` do, give another fingerprint.
    rewrite(model_copy / "adapter" / "ip_kv.safetensors", lambda state: {k: v * 2 for k, v in state.items()})
    manifest = json.loads((model_copy / "lcmla.json").read_text())
    model_dir.write_index(model_copy, manifest["components"], manifest["pipeline"])
    assert model_dir.validate(model_copy).fingerprint() != fingerprint


def test_saving_a_loaded_model_again_writes_what_the_fingerprint_hashes(reloaded, shallow_tiny_dir, tmp_path):
    reloaded.encode_prompt(["a face"], None)  # a model that has been used saves the same files as a fresh one
    resaved = reloaded.save_pretrained(tmp_path / "resaved")
    layout = model_dir.validate(resaved)
    manifests = [json.loads((root / "lcmla.json").read_text()) for root in (shallow_tiny_dir, resaved)]
    first, second = ({k: v for k, v in manifest.items() if k != "files"} for manifest in manifests)
    assert first == second  # the fingerprinted part of the manifest
    labels = [layout.label(path) for path in layout.files if path.name != "lcmla.json"]
    changed = [label for label in labels if (resaved / label).read_bytes() != (shallow_tiny_dir / label).read_bytes()]
    assert changed == []
    assert layout.fingerprint() == reloaded.fingerprint


def test_the_same_weights_give_the_same_files_in_every_process(shallow_tiny_dir, tmp_path):
    """Python's per-process string hashing must not reach the files (it did through peft's target-module set): a
    process with another hash seed saves the files this one saves (shallow_tiny_dir, saved here from the same
    random weights; the shallow tiny has the tiny preset's adapters, in a third of its build time)."""
    other_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # this process's is random, or the one set
    roots = [shallow_tiny_dir, tmp_path / "another"]
    config = json.dumps(shallow_tiny_config())
    env = {**os.environ, "PYTHONHASHSEED": other_seed}
    other = subprocess.run([sys.executable, "-c", SAVE_RANDOM_MODEL, str(roots[1]), config, "0"], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert other.returncode == 0 and other.stdout == "", other.stdout + other.stderr[-3000:]
    first, second = (model_dir.validate(root) for root in roots)
    assert (roots[1] / "lcm_lora/pytorch_lora_weights.safetensors").is_file()
    assert first.fingerprint() == second.fingerprint()


def test_linked_saves_hash_what_they_write_and_reuse_the_base_records(shallow_tiny_dir, tmp_path, monkeypatch):
    """``link_frozen`` (training checkpoints): the base's weight files are named, never hashed again; every file the
    save writes is hashed, so other trained weights always give another fingerprint (the shallow tiny: as any
    model directory, in a fraction of the tiny preset's save time)."""
    model = Personalizer.from_pretrained(shallow_tiny_dir, device="cpu")
    hash_file, hashed = model_dir.saving.sha256_file, []
    for module in (model_dir.format, model_dir.saving):  # where the fingerprint and the index hash files
        monkeypatch.setattr(module, "sha256_file", lambda path: hashed.append(Path(path).resolve()) or hash_file(path))
    fingerprints = []
    for index in range(2):
        with torch.no_grad():
            model.adapter.resampler.latents.add_(1.0)  # same size, other values: a recorded hash must not stand in
        root = model.save_pretrained(tmp_path / f"checkpoint{index}", link_frozen=True)
        assert not (root / "sdxl").exists() and not (root / "image_encoder").exists()
        for label, record in json.loads((root / "lcmla.json").read_text())["files"].items():
            assert record["sha256"] == hash_file(Path(label) if Path(label).is_absolute() else root / label), label
        fingerprints.append(model_dir.validate(root).fingerprint())
    assert fingerprints[0] != fingerprints[1]
    weights = (".safetensors", ".bin", ".onnx")
    assert not [p for p in hashed if shallow_tiny_dir.resolve() in p.parents and p.suffix in weights]


def test_half_precision_save_and_load(tmp_path):
    # The shallow tiny (the tiny preset's modules and VAE, fewer transformer layers): dtypes do not depend on depth.
    half = build_shallow_tiny(dtype=torch.float16)
    root = half.save_pretrained(tmp_path / "half")
    records = json.loads((root / "lcmla.json").read_text())["files"]
    assert records["sdxl/unet/diffusion_pytorch_model.safetensors"]["dtype"] == "float16"
    assert records["kv_encoder/lora.safetensors"]["dtype"] == "float16"
    # The tiny VAE asks for fp32 (force_upcast), as SDXL's does: it is stored and loaded in fp32.
    assert half.vae.config.force_upcast
    assert records["sdxl/vae/diffusion_pytorch_model.safetensors"]["dtype"] == "float32"
    loaded = Personalizer.from_pretrained(root, device="cpu", dtype=torch.float16)
    for name in MODULES:
        source, found = tensors(getattr(half.components, name)), tensors(getattr(loaded.components, name))
        assert all(found[k].dtype == source[k].dtype and torch.equal(found[k], source[k]) for k in source), name
    assert loaded.unet.dtype == torch.float16 and loaded.vae.dtype == torch.float32


# ------------------------------------------------------------------ layouts the manifest allows
def test_outside_paths_vae_override_faces_and_pickles(shallow_tiny, model_copy, tmp_path, astronaut_pack, monkeypatch):
    # The adapter and a VAE override (a changed decoder bias, as pickled diffusers weights) live outside the
    # directory under absolute paths; the image encoder is a transformers pickle; the face pack sits inside.
    elsewhere = tmp_path / "elsewhere"
    shutil.move(model_copy / "adapter", elsewhere / "adapter")
    override = shutil.copytree(model_copy / "sdxl" / "vae", elsewhere / "vae_fp16_fix")
    vae_state = load_file(override / "diffusion_pytorch_model.safetensors")
    vae_state["decoder.conv_out.bias"] = vae_state["decoder.conv_out.bias"] + 0.5
    torch.save(vae_state, override / "diffusion_pytorch_model.bin")
    (override / "diffusion_pytorch_model.safetensors").unlink()
    image_encoder = model_copy / "image_encoder"
    torch.save(load_file(image_encoder / "model.safetensors"), image_encoder / "pytorch_model.bin")
    (image_encoder / "model.safetensors").unlink()
    shutil.copytree(astronaut_pack, model_copy / "faces")

    def use_them(manifest):
        manifest["components"].update(adapter=str(elsewhere / "adapter"), vae=str(override), faces="faces")

    edit_manifest(model_copy, use_them)
    manifest = json.loads((model_copy / "lcmla.json").read_text())
    model_dir.write_index(model_copy, manifest["components"], manifest["pipeline"])  # records the moved files
    torch_load = torch.load
    pickle_loads = []

    def spy(*args, **kwargs):
        pickle_loads.append(kwargs.get("weights_only"))
        return torch_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = Personalizer.from_pretrained(model_copy, device="cpu")

    assert len(pickle_loads) >= 4 and all(pickle_loads)  # two headers at validation, two loads; all weights-only
    source_vae, found_vae = tensors(shallow_tiny.components.vae), tensors(loaded.components.vae)
    assert [k for k in source_vae if not torch.equal(found_vae[k], source_vae[k])] == ["decoder.conv_out.bias"]
    assert torch.equal(found_vae["decoder.conv_out.bias"], vae_state["decoder.conv_out.bias"])
    for name in ("image_encoder", "resampler"):
        source, found = tensors(getattr(shallow_tiny.components, name)), tensors(getattr(loaded.components, name))
        assert all(torch.equal(found[k], source[k]) for k in source), name
    block = shallow_tiny.kv_blocks[0]
    assert torch.equal(*(m.unet.get_submodule(block).attn2.processor.to_k_ip.weight for m in (shallow_tiny, loaded)))
    assert loaded.faces_dir == model_copy / "faces"


class RunsCode:
    """Unpickling this object would create ``marker``: a stand-in for code hidden in a weights file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_a_pickle_holding_more_than_tensors_is_refused_unrun(model_copy, tmp_path):
    marker = tmp_path / "code_ran"
    safe, weights = (model_copy / "image_encoder" / name for name in ("model.safetensors", "pytorch_model.bin"))
    torch.save({**load_file(safe), "payload": RunsCode(marker)}, weights)
    safe.unlink()
    with pytest.raises(ModelFilesError, match="unreadable weights: it holds objects other than tensors, which are never unpickled") as error:
        Personalizer.from_pretrained(model_copy, device="cpu")
    assert str(weights) in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def test_sharded_weights_are_checked_and_fingerprinted_shard_by_shard(model_copy):
    vae = model_copy / "sdxl" / "vae"
    state = load_file(vae / "diffusion_pytorch_model.safetensors")
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}  # fmt: skip
    for shard, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, vae / shard)
    weight_map = {k: shard for shard, shard_keys in shards.items() for k in shard_keys}
    (vae / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    manifest = json.loads((model_copy / "lcmla.json").read_text())
    model_dir.write_index(model_copy, manifest["components"], manifest["pipeline"])

    layout = model_dir.validate(model_copy)
    assert {vae / shard for shard in shards} <= set(layout.files)
    fingerprint = layout.fingerprint()
    second = vae / "diffusion_pytorch_model-00002-of-00002.safetensors"
    rewrite(second, lambda shard: {k: v + 1 for k, v in shard.items()})
    with pytest.raises(IntegrityError, match=re.escape(f"{second}: sha256 ")):
        model_dir.validate(model_copy)  # each shard is verified against its own record
    model_dir.write_index(model_copy, manifest["components"], manifest["pipeline"])
    assert model_dir.validate(model_copy).fingerprint() != fingerprint
    second.unlink()
    with pytest.raises(ModelFilesError, match=re.escape(f"missing files: {second}")):
        model_dir.validate(model_copy)


# ------------------------------------------------------------------ bad directories
@pytest.mark.parametrize(
    "removed, named",
    [
        ("adapter/ip_kv.safetensors", "adapter/ip_kv.safetensors"),
        ("kv_encoder/lora.safetensors", "kv_encoder/lora.safetensors"),
        ("sdxl/vae/config.json", "sdxl/vae/config.json"),
        ("sdxl/unet/diffusion_pytorch_model.safetensors", "sdxl/unet: no weights"),
        ("sdxl/tokenizer_2/tokenizer.json", "sdxl/tokenizer_2: missing CLIP tokenizer files"),
        ("sdxl/scheduler", "sdxl/scheduler/scheduler_config.json"),
        ("lcm_lora", "lcm_lora: missing (component 'lcm_lora'"),
    ],
)
def test_a_missing_file_is_named(model_copy, removed, named):
    target = model_copy / removed
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelFilesError) as error:
        Personalizer.from_pretrained(model_copy, device="cpu")
    assert str(model_copy / named) in str(error.value)


def test_wrong_shapes_list_the_first_keys(model_copy):
    resampler = model_copy / "adapter" / "resampler.safetensors"
    expected = tuple(load_file(resampler)["proj_in.weight"].shape)
    rewrite(resampler, lambda state: {**state, "proj_in.weight": state["proj_in.weight"][:, :-1].contiguous()})
    with pytest.raises(ModelFilesError) as error:
        model_dir.validate(model_copy)
    assert str(error.value) == (
        f"{resampler}: shape mismatch proj_in.weight (proj_in.weight: {(expected[0], expected[1] - 1)} in the file, "
        f"{expected} expected)"
    )

    ip_kv = model_copy / "adapter" / "ip_kv.safetensors"
    state = load_file(ip_kv)
    dropped = sorted(state)[:8]
    save_file({**{k: v for k, v in state.items() if k not in dropped}, "extra.weight": torch.ones(1)}, ip_kv)
    with pytest.raises(ModelFilesError) as error:
        model_dir.validate(model_copy)
    assert str(error.value) == f"{ip_kv}: missing {', '.join(dropped[:5])} (+3 more); unexpected extra.weight"


def test_a_config_that_does_not_match_its_weights(model_copy):
    config_file = model_copy / "sdxl" / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["cross_attention_dim"] *= 2
    config_file.write_text(json.dumps(config))
    mismatch = r"unet/diffusion_pytorch_model.safetensors: shape mismatch .*attn2.to_k.weight.* more\)"
    with pytest.raises(ModelFilesError, match=mismatch):
        model_dir.validate(model_copy)


@pytest.mark.parametrize(
    "file_dtype, recorded, message",
    [
        (torch.float32, "float16", "wrong dtype float32 for 55 tensors (first: latents); expected float16"),
        (torch.float16, "float32", "wrong dtype float16 for 55 tensors (first: latents); expected float32"),
        (torch.int32, None, "wrong dtype int32 for 55 tensors (first: latents); expected a floating-point dtype"),
    ],
)
def test_wrong_dtypes_are_named(model_copy, file_dtype, recorded, message):
    resampler = model_copy / "adapter" / "resampler.safetensors"
    rewrite(resampler, lambda state: {k: v.to(file_dtype) for k, v in state.items()})

    def record(manifest):
        manifest["files"]["adapter/resampler.safetensors"]["dtype"] = recorded
        if recorded is None:
            del manifest["files"]["adapter/resampler.safetensors"]

    edit_manifest(model_copy, record)
    with pytest.raises(ModelFilesError) as error:
        model_dir.validate(model_copy)
    assert str(error.value) == f"{resampler}: {message}"


def test_a_file_of_another_size_than_recorded(model_copy):
    resampler = model_copy / "adapter" / "resampler.safetensors"
    recorded = resampler.stat().st_size
    rewrite(resampler, lambda state: state, metadata={"note": "same tensors, longer header"})
    with pytest.raises(ModelFilesError) as error:
        model_dir.validate(model_copy)
    assert str(error.value) == f"{resampler}: {resampler.stat().st_size} bytes, but lcmla.json records {recorded}"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format_version=2), "format 'lcmla-model' version 2; expected 'lcmla-model' version 1"),
        (lambda m: m.update(format="diffusers"), "format 'diffusers' version 1; expected"),
        (lambda m: m["components"].pop("kv_encoder"), "components: missing required key ['kv_encoder']"),
        (lambda m: m["components"].update(controlnet="cn"), "components: unknown key ['controlnet']"),
        (lambda m: m["components"].update(adapter={"format": "ip-adapter"}), "components.adapter: missing required key ['path']"),
        (lambda m: m["components"].update(adapter=3), "components.adapter: expected a path, or an object with a 'path', got 3 (int)"),
        (lambda m: m["components"].update(vae={"path": "v", "variant": 16}), "components.vae.variant: expected a string, got 16 (int)"),
        (lambda m: m.update(components=["sdxl"]), "components: expected an object, got ['sdxl'] (list)"),
        (lambda m: m["pipeline"].update(face_size="1024"), "pipeline.face_size: expected an integer, got '1024' (str)"),
        (lambda m: m["pipeline"].update(face_size=-8), "pipeline.face_size: expected a positive integer, got -8 (int)"),
        (lambda m: m["files"]["adapter/ip_kv.safetensors"].update(dtype="float12"),
         "files['adapter/ip_kv.safetensors'].dtype: expected one of ['float16', 'bfloat16', 'float32'"),
        (lambda m: m["files"]["adapter/ip_kv.safetensors"].update(sha256="abc"),
         "files['adapter/ip_kv.safetensors'].sha256: expected a sha256 (64 lowercase hex digits), got 'abc' (str)"),
        (lambda m: m["files"]["adapter/ip_kv.safetensors"].pop("bytes"),
         "files['adapter/ip_kv.safetensors']: missing required key ['bytes']"),
        (lambda m: m["files"].update({"adapter/gone.safetensors": m["files"]["adapter/ip_kv.safetensors"]}),
         "files['adapter/gone.safetensors']: the recorded file "),
    ],
)
def test_bad_manifests(model_copy, change, message):
    edit_manifest(model_copy, change)
    with pytest.raises(ModelFilesError) as error:
        Personalizer.from_pretrained(model_copy, device="cpu")
    assert str(error.value).startswith(f"{model_copy / 'lcmla.json'}: ") and message in str(error.value)


@pytest.mark.parametrize(
    "text, message", [(None, "not an lcmla model directory (no lcmla.json)"), ("{not json", "invalid JSON"),
                      ("[]", "format None version None")]  # fmt: skip
)
def test_absent_or_unreadable_manifest(model_copy, text, message):
    manifest = model_copy / "lcmla.json"
    manifest.unlink() if text is None else manifest.write_text(text)
    with pytest.raises(ModelFilesError) as error:
        Personalizer.from_pretrained(model_copy, device="cpu")
    assert str(model_copy) in str(error.value) and message in str(error.value)


def forbidden(*args, **kwargs):
    raise AssertionError("weights were read before validation finished")


def test_validation_fails_before_any_weight_is_read(shallow_tiny_dir, model_copy, monkeypatch):
    unet_file = model_copy / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.write_bytes(b"not safetensors")
    ip_kv = model_copy / "adapter" / "ip_kv.safetensors"
    ip_kv.unlink()
    loaders = [(model_dir.loading, "load"), (model_dir.building, "load_sdxl"), (model_dir.building, "read_state_dict"),
               (torch, "load"), (UNet2DConditionModel, "from_pretrained")]  # fmt: skip
    for module, name in loaders:
        monkeypatch.setattr(module, name, forbidden)
    with monkeypatch.context() as headers:
        headers.setattr(model_dir.format, "file_header", forbidden)  # not even a header: the missing file comes first
        with pytest.raises(ModelFilesError, match=re.escape(f"missing files: {ip_kv}") + "$"):
            Personalizer.from_pretrained(model_copy, device="cpu")
    # With every file present, the unreadable UNet file is found from its header, still before any loading.
    shutil.copy2(shallow_tiny_dir / "adapter" / "ip_kv.safetensors", ip_kv)
    with pytest.raises(ModelFilesError, match="^" + re.escape(f"{unet_file}: unreadable weights")):
        Personalizer.from_pretrained(model_copy, device="cpu")


def test_one_load_wires_the_unet_once(shallow_tiny_dir, monkeypatch):
    from lcmla_sdk import wiring

    wired = []
    install = wiring._install_processors
    monkeypatch.setattr(wiring, "_install_processors", lambda unet: wired.append(unet.device.type) or install(unet))
    Personalizer.from_pretrained(shallow_tiny_dir, device="cpu")  # any model directory
    assert wired == ["cpu"]  # loading wires; validation reads the shapes without wiring, the Personalizer takes it as is
    wired.clear()
    build_shallow_tiny()  # random weights (as a preset's), built afresh: only the tiny preset's builds are cached
    assert wired == ["cpu"]


@pytest.mark.parametrize("kv_encoder", [{"lora_rank": 4, "kv_lora_rank": 4}, {"lora_rank": 4, "kv_lora_rank": 0}, {"lora_rank": 8, "kv_lora_rank": 2}])
def test_the_shapes_validation_expects_are_those_wiring_adds(kv_encoder):
    from lcmla_sdk.weights import shapes
    from lcmla_sdk.wiring import lookahead_shapes, lookahead_weights, wire_unet

    # The shallow tiny UNet: every kind of attention block the tiny preset has, fewer of each (the shapes are
    # per layer; the check is that of each layer).
    with torch.device("meta"):
        plain = UNet2DConditionModel.from_config(shallow_tiny_config()["unet"])
        wired = UNet2DConditionModel.from_config(shallow_tiny_config()["unet"])
        wire_unet(wired, kv_encoder)
    added = lookahead_weights(wired)
    expected = lookahead_shapes(plain, kv_encoder)
    assert expected == {part: shapes(getattr(added, part)) for part in ("ip_kv", "kv_projections", "kv_lora")}
    assert expected == lookahead_shapes(wired, kv_encoder)  # a wired UNet reads the same
