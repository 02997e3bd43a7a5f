"""``lcmla convert`` (issue 3, item 4): the authors' checkpoint, original IP-Adapter files and LCM-LoRAs.

The authors' state dicts are built from the key list of their released files (the layout in
``shared/reference/official_ckpt_layout.json``) at the tiny preset's shapes. What each key must become is derived
here from that layout's notes (aliases, rank-4 LoRA without alpha, the h94 index map, the resampler's original
names), never from :mod:`lcmla_sdk.convert`, so a wrong mapping there fails these tests.
"""

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import unet_inputs
from lcmla_sdk import Personalizer, model_dir
from lcmla_sdk.cli import app
from lcmla_sdk.convert import convert, is_no_kv_checkpoint, read_checkpoint
from lcmla_sdk.errors import ModelFilesError
from lcmla_sdk.lora import KV_ENCODER_ADAPTER, LCM_ADAPTER, activate_adapters
from lcmla_sdk.weights import load_lcm_lora, read_ip_adapter
from lcmla_sdk.wiring import base_linear

# The authors' checkpoint layout (shared/reference/official_ckpt_layout.json), kept with the tests so that a clean
# checkout tests conversion against the real key names.
LAYOUT_FILE = Path(__file__).resolve().parent / "data" / "official_ckpt_layout.json.gz"

RANK = 4  # encoder_lora_rank = kvcopy_lora_rank = 4, no alpha: W_eff = W + up @ down (layout notes, "lora")
BLOCK = "mid_block.attentions.0.transformer_blocks.3"  # any of the 70 K/V blocks
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_layer\.(?P<side>down|up)\.weight")
MARKED_NO_KV = ["--no-kv-encoder", "--dtype", "float32"]  # the CLI options of the conversion marked_no_kv


@pytest.fixture(scope="module")
def layout() -> dict:
    return json.loads(gzip.decompress(LAYOUT_FILE.read_bytes()))


# ------------------------------------------------------------------ the authors' files at tiny shapes
def known(shape: tuple[int, ...], scale: float) -> torch.Tensor:
    """A fixed, asymmetric tensor (a transposed or swapped weight would not match it)."""
    count = torch.tensor(shape).prod().item()
    return scale * torch.sin(torch.arange(count, dtype=torch.float32) * 0.7 + 0.3).reshape(shape)


def h94_image_proj(resampler: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``IPAdapterPlusImageProjection`` weights in the original IP-Adapter Plus ``Resampler`` names."""
    state = {name: resampler[name] for name in resampler if not name.startswith("layers.")}
    depth = len({name.split(".")[1] for name in resampler if name.startswith("layers.")})
    for i in range(depth):
        layer = f"layers.{i}."
        for suffix in ("weight", "bias"):
            state[f"{layer}0.norm1.{suffix}"] = resampler[f"{layer}ln0.{suffix}"]
            state[f"{layer}0.norm2.{suffix}"] = resampler[f"{layer}ln1.{suffix}"]
            state[f"{layer}1.0.{suffix}"] = resampler[f"{layer}ff.0.{suffix}"]
        state[f"{layer}0.to_q.weight"] = resampler[f"{layer}attn.to_q.weight"]
        to_k, to_v = resampler[f"{layer}attn.to_k.weight"], resampler[f"{layer}attn.to_v.weight"]
        state[f"{layer}0.to_kv.weight"] = torch.cat([to_k, to_v])
        state[f"{layer}0.to_out.weight"] = resampler[f"{layer}attn.to_out.0.weight"]
        state[f"{layer}1.1.weight"] = resampler[f"{layer}ff.1.net.0.proj.weight"]
        state[f"{layer}1.3.weight"] = resampler[f"{layer}ff.1.net.2.weight"]
    return state


def h94_ip_adapter(layout: dict, sdxl_files: dict) -> dict[str, dict[str, torch.Tensor]]:
    """``ip-adapter-plus-face_sdxl_vit-h`` at tiny shapes: ``ip_adapter`` key ``n.to_k_ip.weight`` per the layout's
    h94 index map (attention processor n = 2i+1 is the i-th block's attn2)."""
    generator = torch.Generator().manual_seed(2)
    ip_adapter = {}
    for _, block, index in layout["ip_adapter_index_map"]["rows"]:
        for kv in ("k", "v"):
            shape = sdxl_files["unet"][f"{block}.attn2.to_{kv}.weight"].shape
            ip_adapter[f"{index}.to_{kv}_ip.weight"] = torch.randn(shape, generator=generator)
    image_proj = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in sdxl_files["image_proj"].items()}
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.fixture(scope="module")
def sdxl_files(tiny_dir) -> dict[str, dict[str, torch.Tensor]]:
    """The tiny SDXL base UNet, CLIP image encoder and resampler (original names) that convert's inputs hold."""
    return {
        "unet": load_file(tiny_dir / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"),
        "image_encoder": load_file(tiny_dir / "image_encoder" / "model.safetensors"),
        "image_proj": h94_image_proj(load_file(tiny_dir / "adapter" / "resampler.safetensors")),
    }


def authors_state(layout: dict, file: str, sdxl_files: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every key of the authors' ``file`` with a tensor of the tiny model's shape, as their training leaves it.

    Frozen parts are the SDXL base / CLIP inputs (CLIP stored fp16, per the layout's dtype notes); trained parts
    (LoRA, ``extract_kv*`` projections) are seeded random; alias keys share the tensor they alias, as
    ``torch.save`` stores them. The tiny CLIP has 2 of ViT-H's 32 layers: only those keys are kept.
    """
    unet, clip, image_proj = sdxl_files["unet"], sdxl_files["image_encoder"], sdxl_files["image_proj"]
    generator = torch.Generator().manual_seed(seed)
    aliases = layout["aliases"]
    state = {}
    for key, *_ in layout["checkpoints"][file]["keys"]:
        prefix, name = key.split(".", 1)
        # Shapes of extract_kv{1,2} equal those of attn{1,2} (layout notes, "extract_kv").
        source = re.sub(r"\.extract_kv([12])\.", r".attn\1.", name)
        lora = LORA_KEY.fullmatch(source)
        if key in aliases:
            continue
        if prefix == "image_encoder":
            if name in clip:
                state[key] = clip[name].half()
        elif prefix == "image_proj_model":
            state[key] = image_proj[name].clone()
        elif lora:
            out_features, in_features = unet[f"{lora['module']}.weight"].shape
            shape = (RANK, in_features) if lora["side"] == "down" else (out_features, RANK)
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        elif ".extract_kv" in name:
            weight = unet[source]
            state[key] = torch.randn(weight.shape, generator=generator) * weight.shape[1] ** -0.5
        else:
            state[key] = unet[name].clone()
    for alias, canonical in aliases.items():
        state[alias] = state[canonical]
    assert {k.split(".", 1)[1] for k in state if k.startswith("image_encoder.")} == set(clip)
    return state


def save_checkpoint(state: dict, folder: Path, name: str = "encoder_plus_adapter_ckpt.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / name)
    return folder / name


def convert_tiny(tiny_dir: Path, out: Path, **kwargs) -> dict[str, int]:
    return convert(out, tiny_dir / "sdxl", tiny_dir / "image_encoder", **kwargs)


def expected_counts(layout: dict, state: dict) -> dict[str, int]:
    counts = layout["unet_to_diffusers_0_42"]["counts"]
    return {
        "SDXL base": counts["exact_1to1"], "alias": counts["alias_of_attn_exact"] + counts["alias_of_attn_lora"],
        "LoRA": counts["lora_attn"] + counts["extract_kv1_lora"], "extract_kv1": counts["extract_kv1_base"],
        "extract_kv2": counts["extract_kv2_base"], "image encoder": sum(k.startswith("image_encoder.") for k in state),
        "image_proj_model": layout["summary"]["prefix_counts"]["image_proj_model"],
    }  # fmt: skip


def counts_by_word(counts: dict[str, int], words) -> dict[str, int]:
    return {word: sum(count for label, count in counts.items() if word in label) for word in words}


# ------------------------------------------------------------------ 1. the authors' checkpoint
@pytest.fixture(scope="module")
def authors_file(layout, sdxl_files, tmp_path_factory) -> tuple[dict, Path]:
    """The authors' checkpoint with a known K LoRA at ``BLOCK`` and a marked CLIP weight, saved as they release it."""
    state = authors_state(layout, "encoder_plus_adapter_ckpt.bin", sdxl_files)
    prefix = f"encoder_unet.{BLOCK}"
    for module in ("extract_kv1.to_k", "attn1.to_k"):
        down, up = f"{prefix}.{module}.lora_layer.down.weight", f"{prefix}.{module}.lora_layer.up.weight"
        state[down], state[up] = known(state[down].shape, 0.5), known(state[up].shape, 0.25).flip(0)
    for alias, canonical in layout["aliases"].items():
        state[alias] = state[canonical]  # the aliases of attn1's LoRA follow its new values
    marked = "image_encoder.vision_model.post_layernorm.weight"  # differs from the --image-encoder folder's
    state[marked] = state[marked] + 0.5
    return state, save_checkpoint(state, tmp_path_factory.mktemp("authors"))


@pytest.fixture(scope="module", params=[False, True], ids=["peft-lora", "fused-kv-lora"])
def converted(request, authors_file, tiny_dir, tmp_path_factory):
    state, checkpoint = authors_file
    out = tmp_path_factory.mktemp("converted") / "model"
    counts = convert_tiny(tiny_dir, out, checkpoint=checkpoint, fuse_kv_lora=request.param, dtype=torch.float32)
    return state, counts, Personalizer.from_pretrained(out, device="cpu")


def weight_and_lora(state: dict, module: str) -> tuple[torch.Tensor, ...]:
    """The authors' weight of ``module`` and its LoRA ``down``, ``up``, in float64."""
    parts = ("weight", "lora_layer.down.weight", "lora_layer.up.weight")
    return tuple(state[f"{module}.{part}"].double() for part in parts)


def test_every_key_of_the_authors_checkpoint_is_accounted_for(converted, layout):
    state, counts, model = converted
    expected = expected_counts(layout, state)
    assert counts_by_word(counts, expected) == expected
    assert sum(counts.values()) == len(state)
    assert model.lcm_denoiser is None  # no --lcm-lora given: no fast mode


@torch.no_grad()
def test_kv_lora_changes_that_layers_emitted_k_by_up_at_down(converted, layout):
    state, _, model = converted
    weight, down, up = weight_and_lora(state, f"encoder_unet.{BLOCK}.extract_kv1.to_k")
    layer = layout["kv_blocks"]["forward_and_consumption_order"].index(BLOCK)
    seen = []
    projection = model.kv_encoder.unet.get_submodule(BLOCK).attn1.processor.to_k_kv
    handle = projection.register_forward_pre_hook(lambda module, args: seen.append(args[0].double()))
    try:
        k = model.kv_encoder(*unet_inputs(model, batch=1, side=8))[2 * layer].double()
    finally:
        handle.remove()
    (x,) = seen
    plain_k = x @ weight.T
    change = x @ (up @ down).T  # scale 1: the authors' LoRA has no alpha
    assert change.abs().mean() > 0.1 * plain_k.abs().mean()
    torch.testing.assert_close(k - plain_k, change, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_attention_lora_is_seen_by_the_kv_encoder_only(converted):
    state, _, model = converted
    weight, down, up = weight_and_lora(state, f"encoder_unet.{BLOCK}.attn1.to_k")
    to_k = model.unet.get_submodule(BLOCK).attn1.to_k
    x = torch.randn(2, 5, weight.shape[1])
    try:
        activate_adapters(model.unet, (KV_ENCODER_ADAPTER,))
        encoder_k = to_k(x).double()
    finally:
        activate_adapters(model.unet, ())
    denoiser_k = to_k(x).double()
    torch.testing.assert_close(denoiser_k, x.double() @ weight.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encoder_k - denoiser_k, x.double() @ (up @ down).T, rtol=1e-4, atol=1e-5)


def test_adapter_and_image_encoder_weights_land_unchanged(converted, layout):
    state, _, model = converted
    resampler = model.components.resampler
    hidden = resampler.latents.shape[-1]
    to_kv = state["image_proj_model.layers.1.0.to_kv.weight"]
    torch.testing.assert_close(resampler.layers[1].attn.to_k.weight, to_kv[:hidden], rtol=0, atol=0)
    torch.testing.assert_close(resampler.layers[1].attn.to_v.weight, to_kv[hidden:], rtol=0, atol=0)
    torch.testing.assert_close(resampler.latents, state["image_proj_model.latents"], rtol=0, atol=0)
    for block in (BLOCK, layout["kv_blocks"]["forward_and_consumption_order"][0]):
        processor = model.unet.get_submodule(block).attn2.processor
        for kv in ("k", "v"):
            expected = state[f"encoder_unet.{block}.extract_kv2.to_{kv}.weight"]
            torch.testing.assert_close(getattr(processor, f"to_{kv}_ip").weight, expected, rtol=0, atol=0)
    marked = state["image_encoder.vision_model.post_layernorm.weight"].float()
    clip = model.components.image_encoder.vision_model
    torch.testing.assert_close(clip.post_layernorm.weight, marked, rtol=0, atol=0)


# ------------------------------------------------------------------ 2 and 6. the no-KV checkpoint, through the CLI
def convert_args(tiny_dir: Path, out: Path, checkpoint: Path) -> list[str]:
    inputs = {"--sdxl": tiny_dir / "sdxl", "--image-encoder": tiny_dir / "image_encoder", "--checkpoint": checkpoint}
    return ["convert", "--out", str(out), *(str(part) for option in inputs.items() for part in option)]


@pytest.fixture(scope="module")
def no_kv_by_cli(layout, sdxl_files, tiny_dir, tmp_path_factory):
    """``encoder_plus_adapter_no_kv.bin`` converted by ``lcmla convert`` (default dtype: float16 files).

    Same strict loader and file size as the full checkpoint: the layout infers the same keys ("no_kv_checkpoint").
    """
    state = authors_state(layout, "encoder_plus_adapter_no_kv.bin", sdxl_files, seed=1)
    folder = tmp_path_factory.mktemp("no_kv")
    checkpoint = save_checkpoint(state, folder, "encoder_plus_adapter_no_kv.bin")
    return state, folder / "model", CliRunner().invoke(app, convert_args(tiny_dir, folder / "model", checkpoint))


def test_cli_convert_prints_the_counts(no_kv_by_cli, layout):
    state, out, result = no_kv_by_cli
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[-1] == str(out)
    printed = {label: int(count) for count, label in (line.strip().split("  ", 1) for line in lines[:-1])}
    expected = expected_counts(layout, state)
    assert counts_by_word(printed, expected) == expected
    assert sum(printed.values()) == len(state)


def test_cli_convert_bad_input_is_one_line_without_traceback(authors_file, tiny_dir, tmp_path):
    state, _ = authors_file
    checkpoint = save_checkpoint({**state, "adapter_modules.1.to_k_ip.weight": torch.zeros(2)}, tmp_path)
    result = CliRunner().invoke(app, convert_args(tiny_dir, tmp_path / "model", checkpoint))
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and "adapter_modules.1.to_k_ip.weight" in line
    assert not (tmp_path / "model").exists()


@pytest.fixture(scope="module")
def no_kv_model(no_kv_by_cli) -> Personalizer:
    """``no_kv_by_cli``'s model directory, loaded once for the tests below (each leaves it as it found it)."""
    _, out, result = no_kv_by_cli
    assert result.exit_code == 0, result.output
    return Personalizer.from_pretrained(out, device="cpu")


def test_no_kv_checkpoint_loads_and_generates_without_kv(no_kv_by_cli, no_kv_model, face):
    state, out, result = no_kv_by_cli
    assert result.exit_code == 0, result.output
    ip_weight = state[f"encoder_unet.{BLOCK}.extract_kv2.to_k.weight"].half().float()  # stored float16
    to_k_ip = no_kv_model.unet.get_submodule(BLOCK).attn2.processor.to_k_ip
    torch.testing.assert_close(to_k_ip.weight, ip_weight, rtol=0, atol=0)
    identity = no_kv_model.encode_face(face)
    images = [
        no_kv_model.generate(identity, "a face", steps=2, seed=0, use_kv=False, adapter_scale=scale, output="pt")
        for scale in (1.0, 0.0)
    ]
    assert images[0].shape == (1, 3, no_kv_model.default_size, no_kv_model.default_size)
    assert torch.isfinite(images[0]).all()
    assert not torch.allclose(images[0], images[1])  # the converted IP-Adapter weights steer the image


def test_no_kv_model_is_marked_defaults_to_no_kv_and_refuses_kv(no_kv_by_cli, no_kv_model, face, tmp_path, monkeypatch):
    _, out, result = no_kv_by_cli
    assert json.loads((out / "lcmla.json").read_text())["pipeline"]["has_kv_encoder"] is False
    assert no_kv_model.has_kv_encoder is False
    identity = no_kv_model.encode_face(face)
    explicit = no_kv_model.generate(identity, "a face", steps=1, seed=0, use_kv=False, output="latent")

    def untrained(*args):
        raise AssertionError("the K/V-encoder of a no-K/V model ran")

    no_kv_model.rebuild_networks(kv_encoder=untrained)
    try:
        torch.testing.assert_close(no_kv_model.generate(identity, "a face", steps=1, seed=0, output="latent"), explicit)
        with pytest.raises(ValueError, match="^use_kv: this model was converted from the authors' no-K/V"):
            no_kv_model.generate(identity, "a face", steps=1, use_kv=True)
        with pytest.raises(ValueError, match="^use_kv: .*'no'"):
            no_kv_model.generate(identity, "a face", steps=1, use_kv="no")
    finally:
        no_kv_model.rebuild_networks()  # the shared model's own networks again
    # The mark survives saving, and the CLI generates with the model's default: one load of the saved copy, by the
    # CLI, checks both (its model is marked, and is asked for the default).
    copy = no_kv_model.save_pretrained(tmp_path / "copy")
    generate, calls = Personalizer.generate, []

    def spy(personalizer, *args, **kwargs):
        calls.append((personalizer.has_kv_encoder, kwargs["use_kv"]))
        return generate(personalizer, *args, **kwargs)

    monkeypatch.setattr(Personalizer, "generate", spy)
    generated = CliRunner().invoke(app, ["generate", "--model", str(copy), "--prompt", "a face", "--steps", "1",
                                         "--seed", "0", "--out", str(tmp_path / "images")])  # fmt: skip
    assert generated.exit_code == 0, generated.output
    assert calls == [(False, None)]


@pytest.fixture(scope="module")
def marked_no_kv(authors_file, tiny_dir, tmp_path_factory) -> Path:
    """The full checkpoint converted by ``lcmla convert`` with ``MARKED_NO_KV`` (once for the tests below); not
    loaded: the tests read its mark and fingerprint (a loaded model's mark is the no-K/V tests' concern)."""
    out = tmp_path_factory.mktemp("marked") / "model"
    result = CliRunner().invoke(app, [*convert_args(tiny_dir, out, authors_file[1]), *MARKED_NO_KV])
    assert result.exit_code == 0, result.output
    return out


def test_the_full_checkpoint_keeps_its_kv_and_the_name_rule(converted, authors_file, marked_no_kv, tmp_path):
    model = converted[2]
    assert model.has_kv_encoder is True and "has_kv_encoder" not in model.config["pipeline"]
    checkpoint = authors_file[1]
    assert not is_no_kv_checkpoint(checkpoint)
    assert is_no_kv_checkpoint(checkpoint.parent / "encoder_plus_adapter_no_kv.bin")
    (tmp_path / "run_no_kv").mkdir()
    assert is_no_kv_checkpoint(tmp_path / "run_no_kv")  # a folder of their files, named so
    marks = json.loads((marked_no_kv / "lcmla.json").read_text())["pipeline"]
    assert marks["has_kv_encoder"] is False  # --no-kv-encoder marks a checkpoint whatever its name


# ------------------------------------------------------------------ the fp16-fix VAE (issue 11, item 5)
def test_vae_is_the_given_fp16_fix_one_and_decodes_in_half(authors_file, tiny_dir, tmp_path):
    fix = tmp_path / "sdxl-vae-fp16-fix"
    fix.mkdir()
    config = json.loads((tiny_dir / "sdxl" / "vae" / "config.json").read_text())
    (fix / "config.json").write_text(json.dumps({**config, "force_upcast": False}))  # as the fp16-fix VAE's config
    state = load_file(tiny_dir / "sdxl" / "vae" / "diffusion_pytorch_model.safetensors")
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] + 0.25
    save_file(state, fix / "diffusion_pytorch_model.safetensors")
    result = CliRunner().invoke(app, [*convert_args(tiny_dir, tmp_path / "model", authors_file[1]), "--vae", str(fix)])
    assert result.exit_code == 0, result.output
    assert "note: this VAE decodes in float32" not in result.output
    model = Personalizer.from_pretrained(tmp_path / "model", device="cpu", dtype=torch.float16)
    assert model.vae.dtype == torch.float16  # SDXL's own VAE would be kept in float32 (force_upcast)
    found = model.components.vae.state_dict()["decoder.conv_out.bias"]
    torch.testing.assert_close(found.float(), state["decoder.conv_out.bias"].half().float(), rtol=0, atol=0)


def test_without_vae_the_cli_says_what_is_lost(no_kv_by_cli):
    assert "note: this VAE decodes in float32 (force_upcast); the authors decode with the fp16-fix" in no_kv_by_cli[2].output


# ------------------------------------------------------------------ 3. keys that do not fit
def test_an_alias_that_differs_from_what_it_aliases_is_an_error(authors_file, layout, tiny_dir, tmp_path):
    state, _ = authors_file
    alias = next(a for a, canonical in layout["aliases"].items() if canonical.endswith(f"{BLOCK}.attn2.to_v.weight"))
    state = {**state, alias: state[alias] + 1e-3}
    with pytest.raises(ModelFilesError, match=re.escape(alias)):
        convert_tiny(tiny_dir, tmp_path / "model", checkpoint=save_checkpoint(state, tmp_path))
    assert not (tmp_path / "model").exists()


def test_unknown_keys_are_an_error_listing_them(authors_file, tiny_dir, tmp_path):
    state, _ = authors_file
    # extract_kv2 is trained in full: a LoRA on it is not the authors' layout.
    unknown = ["adapter_modules.1.to_k_ip.weight", f"encoder_unet.{BLOCK}.extract_kv2.to_k.lora_layer.down.weight"]
    state = {**state, **{key: torch.zeros(4, 4) for key in unknown}}
    with pytest.raises(ModelFilesError, match="2 keys") as error:
        convert_tiny(tiny_dir, tmp_path / "model", checkpoint=save_checkpoint(state, tmp_path))
    assert all(key in str(error.value) for key in unknown)


@pytest.mark.parametrize(
    "missing, named, fuse_kv_lora",
    [
        ("encoder_unet.conv_in.weight", "conv_in.weight", False),
        (f"encoder_unet.{BLOCK}.extract_kv1.to_v.weight", f"{BLOCK}.to_v_kv", False),
        (f"encoder_unet.{BLOCK}.attn2.to_out.0.lora_layer.up.weight", f"{BLOCK}.attn2.to_out.0.lora_B", False),
        (f"encoder_unet.{BLOCK}.extract_kv1.to_k.lora_layer.up.weight", f"{BLOCK}.attn1.processor.to_k_kv", True),
    ],
    ids=["sdxl-base", "kv-projection", "lora", "lora-to-fuse"],
)
def test_a_missing_key_is_an_error_naming_it(authors_file, layout, tiny_dir, tmp_path, missing, named, fuse_kv_lora):
    state, _ = authors_file
    gone = {missing, *(alias for alias, canonical in layout["aliases"].items() if canonical == missing)}
    state = {key: value for key, value in state.items() if key not in gone}
    checkpoint = save_checkpoint(state, tmp_path)
    with pytest.raises(ModelFilesError, match=re.escape(named)):
        convert_tiny(tiny_dir, tmp_path / "model", checkpoint=checkpoint, fuse_kv_lora=fuse_kv_lora)
    assert not (tmp_path / "model").exists()


def test_a_file_that_is_not_a_flat_state_dict_is_an_error(layout, sdxl_files, tiny_dir, tmp_path):
    torch.save(h94_ip_adapter(layout, sdxl_files), tmp_path / "ip_adapter.bin")  # nested: belongs to --ip-adapter
    with pytest.raises(ModelFilesError, match="not a flat state dict of tensors; .*image_proj, ip_adapter"):
        convert_tiny(tiny_dir, tmp_path / "model", checkpoint=tmp_path / "ip_adapter.bin")
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    with pytest.raises(ModelFilesError, match=re.escape(f"{tmp_path / 'list.bin'}: not a state dict")):
        convert_tiny(tiny_dir, tmp_path / "model", checkpoint=tmp_path / "list.bin")


def test_a_folder_of_component_files_reads_as_one_checkpoint(authors_file, tmp_path):
    """accelerate's save_state: several ``pytorch_model*.bin`` files, keys maybe under a DDP ``module.`` prefix."""
    state, _ = authors_file
    keys = list(state)[:500]
    torch.save({f"module.{k}": state[k] for k in keys[: len(keys) // 2]}, tmp_path / "pytorch_model.bin")
    torch.save({k: state[k] for k in keys[len(keys) // 2 :]}, tmp_path / "pytorch_model_1.bin")
    read = read_checkpoint(tmp_path)
    assert list(read) == keys
    assert all(torch.equal(read[k], state[k]) for k in keys)
    torch.save({keys[0]: state[keys[0]] + 1}, tmp_path / "pytorch_model_2.bin")
    with pytest.raises(ModelFilesError, match=re.escape(keys[0])):
        read_checkpoint(tmp_path)


# ------------------------------------------------------------------ 4-5. original IP-Adapter file, LCM-LoRA
LCM_RANK, LCM_ALPHA = 2, 1.0
# The layers the test LCM-LoRA adapts, with their kohya names in the original SDXL (SGM) numbering:
# middle_block = (resnet, attention, resnet); input_blocks.0 is conv_in; a resnet's conv1 is in_layers.2.
LCM_SGM_NAMES = {
    f"{BLOCK}.attn1.to_k": "middle_block_1_transformer_blocks_3_attn1_to_k",
    "down_blocks.0.resnets.0.conv1": "input_blocks_1_0_in_layers_2",
}


def lcm_lora_file(folder: Path, file_format: str, unet: dict) -> tuple[Path, dict[str, tuple], float]:
    """An SDXL LoRA on a linear and a conv layer, as ``kohya`` (``lora_unet_*`` diffusers names, alpha),
    ``kohya-sgm`` (the same in SGM names) or ``diffusers`` (peft names, no alpha) write it.

    Returns the file, ``module -> (down, up)`` and the scale diffusers must apply: alpha / rank, or 1 without alpha.
    """
    weights, state = {}, {}
    for module, sgm_name in LCM_SGM_NAMES.items():
        out_features, in_features, *kernel = unet[f"{module}.weight"].shape
        down = known((LCM_RANK, in_features, *kernel), 0.3)
        up = known((out_features, LCM_RANK, *[1 for _ in kernel]), 0.2).flip(0)
        weights[module] = (down, up)
        if file_format == "diffusers":
            state.update({f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up})
        else:
            name = "lora_unet_" + (sgm_name if file_format == "kohya-sgm" else module.replace(".", "_"))
            state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
            state[f"{name}.alpha"] = torch.tensor(LCM_ALPHA)
    save_file(state, str(folder / f"lcm_lora_{file_format}.safetensors"))
    scale = 1.0 if file_format == "diffusers" else LCM_ALPHA / LCM_RANK
    return folder / f"lcm_lora_{file_format}.safetensors", weights, scale


@torch.no_grad()
def assert_lcm_lora_applied(unet, lora_weights: dict[str, tuple], scale: float) -> None:
    """With the ``lcm`` adapter active, each adapted layer's output moves by exactly scale x up(down(x))."""
    (linear_name, (down, up)), (conv_name, (conv_down, conv_up)) = lora_weights.items()
    linear, conv = unet.get_submodule(linear_name), unet.get_submodule(conv_name)
    x, image = torch.randn(2, 5, down.shape[1]), torch.randn(1, conv_down.shape[1], 8, 8)
    try:
        activate_adapters(unet, (LCM_ADAPTER,))
        lcm_linear, lcm_conv = linear(x), conv(image)
    finally:
        activate_adapters(unet, ())
    torch.testing.assert_close(lcm_linear - linear(x), scale * x @ (up @ down).T, rtol=1e-4, atol=1e-5)
    conv_change = scale * torch.nn.functional.conv2d(torch.nn.functional.conv2d(image, conv_down, padding=1), conv_up)
    torch.testing.assert_close(lcm_conv - conv(image), conv_change, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def from_ip_adapter(layout, sdxl_files, tiny_dir, tmp_path_factory):
    """SDXL + the original IP-Adapter file (nested .bin, as the authors used) + a kohya LCM-LoRA, converted, loaded."""
    folder = tmp_path_factory.mktemp("ip_adapter")
    ip_adapter = h94_ip_adapter(layout, sdxl_files)
    torch.save(ip_adapter, folder / "ip-adapter-plus-face_sdxl_vit-h.bin")
    lcm_lora, lora_weights, scale = lcm_lora_file(folder, "kohya", sdxl_files["unet"])
    counts = convert_tiny(
        tiny_dir, folder / "model", ip_adapter=folder / "ip-adapter-plus-face_sdxl_vit-h.bin", lcm_lora=lcm_lora,
        dtype=torch.float32,
    )  # fmt: skip
    return ip_adapter, counts, (lora_weights, scale), Personalizer.from_pretrained(folder / "model", device="cpu")


def test_original_ip_adapter_weights_land_by_the_h94_index(from_ip_adapter, layout, sdxl_files):
    ip_adapter, counts, _, model = from_ip_adapter
    assert counts_by_word(counts, ("image_proj", "ip_adapter")) == {"image_proj": 51, "ip_adapter": 140}
    for _, block, index in layout["ip_adapter_index_map"]["rows"]:
        processor = model.unet.get_submodule(block).attn2.processor
        for kv in ("k", "v"):
            expected = ip_adapter["ip_adapter"][f"{index}.to_{kv}_ip.weight"]
            assert torch.equal(getattr(processor, f"to_{kv}_ip").weight, expected), (block, index)
    resampler, image_proj = model.components.resampler, ip_adapter["image_proj"]
    hidden = resampler.latents.shape[-1]
    assert torch.equal(resampler.layers[3].attn.to_v.weight, image_proj["layers.3.0.to_kv.weight"][hidden:])
    assert torch.equal(resampler.layers[0].ff[1].net[2].weight, image_proj["layers.0.1.3.weight"])
    # Without the authors' weights the KV-encoder starts as theirs does: K/V copies of attn1, LoRA up = 0.
    processor = model.unet.get_submodule(BLOCK).attn1.processor
    assert torch.equal(base_linear(processor.to_k_kv).weight, sdxl_files["unet"][f"{BLOCK}.attn1.to_k.weight"])
    assert all(not p.any() for name, p in model.unet.named_parameters() if f"lora_B.{KV_ENCODER_ADAPTER}" in name)


def test_flat_safetensors_ip_adapter_reads_as_the_nested_bin(layout, sdxl_files, tmp_path):
    nested = h94_ip_adapter(layout, sdxl_files)
    torch.save(nested, tmp_path / "ip_adapter.bin")
    flat = {f"{part}.{key}": value for part, values in nested.items() for key, value in values.items()}
    save_file(flat, str(tmp_path / "ip_adapter.safetensors"))
    for read in (read_ip_adapter(tmp_path / "ip_adapter.bin"), read_ip_adapter(tmp_path / "ip_adapter.safetensors")):
        assert set(read) == set(nested)
        for part, values in nested.items():
            assert set(read[part]) == set(values)
            assert all(torch.equal(read[part][key], value) for key, value in values.items())


def test_converted_lcm_lora_changes_its_layers_by_the_scaled_product(from_ip_adapter):
    *_, (lora_weights, scale), model = from_ip_adapter
    assert_lcm_lora_applied(model.unet, lora_weights, scale)


@pytest.mark.parametrize("file_format", ["diffusers", "kohya-sgm"])
def test_lcm_lora_formats_that_diffusers_loads(file_format, sdxl_files, tiny_dir, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "sdxl" / "unet")
    lcm_lora, lora_weights, scale = lcm_lora_file(tmp_path, file_format, sdxl_files["unet"])
    load_lcm_lora(unet, lcm_lora)
    assert_lcm_lora_applied(unet, lora_weights, scale)


@torch.no_grad()
def test_lcm_lora_changes_the_fast_denoiser_only(from_ip_adapter):
    model = from_ip_adapter[-1]
    inputs = unet_inputs(model, batch=1, side=8)
    assert not torch.allclose(model.lcm_denoiser(*inputs), model.denoiser(*inputs))


# ------------------------------------------------------------------ 7. pickles are never run
class RunsCodeWhenUnpickled:
    """Unpickles as ``Path.touch(marker)``: a loader that executes pickled code leaves the marker behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("option", ["checkpoint", "ip_adapter", "lcm_lora"])
def test_a_pickle_holding_code_is_refused_unrun(option, sdxl_files, layout, tiny_dir, tmp_path):
    marker = tmp_path / "code-ran"
    malicious = tmp_path / "weights.bin"
    torch.save({"conv_in.weight": torch.zeros(1), "payload": RunsCodeWhenUnpickled(marker)}, malicious)
    inputs = {option: malicious}
    if option == "lcm_lora":
        torch.save(h94_ip_adapter(layout, sdxl_files), tmp_path / "ip_adapter.bin")
        inputs["ip_adapter"] = tmp_path / "ip_adapter.bin"
    refusal = f"{malicious}: cannot read weights safely: it holds objects other than tensors"
    with pytest.raises(ModelFilesError, match=re.escape(refusal)):
        convert_tiny(tiny_dir, tmp_path / "model", **inputs)
    assert not marker.exists()
    torch.load(malicious, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


# ------------------------------------------------------------------ hf:// inputs (issue 21), from a local hub cache
# Files of stabilityai/stable-diffusion-xl-base-1.0 (abridged to one of each kind): what convert must fetch of them.
SDXL_REPO = ["model_index.json", "sd_xl_base_1.0.safetensors", "scheduler/scheduler_config.json", "README.md",
             "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
             "text_encoder/model.onnx", "text_encoder/openvino_model.bin", "text_encoder_2/flax_model.msgpack",
             "tokenizer/merges.txt", "tokenizer/vocab.json", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "unet/model.onnx_data", "vae/config.json",
             "vae_1_0/diffusion_pytorch_model.safetensors", "vae_decoder/config.json"]  # fmt: skip


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_hub_folders_fetch_only_what_loading_reads(variant):
    from huggingface_hub.utils import filter_repo_objects  # what snapshot_download filters with

    from lcmla_sdk.hub import SDXL_FOLDERS, folder_patterns

    fetched = set(filter_repo_objects(SDXL_REPO, allow_patterns=["model_index.json", *folder_patterns(list(SDXL_FOLDERS), variant)]))
    weights = {"text_encoder/model", "unet/diffusion_pytorch_model"}
    suffix = ".fp16.safetensors" if variant else ".safetensors"
    assert fetched == {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                       "tokenizer/merges.txt", "tokenizer/vocab.json", "vae/config.json", *(w + suffix for w in weights)}  # fmt: skip


def hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> None:
    """A Hugging Face cache entry for ``repo_id`` (as ``huggingface_hub`` writes one): ``refs/main`` names a
    snapshot folder holding ``files`` (path in the repository -> local file or folder to copy)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    for name, source in files.items():
        target = repo / "snapshots" / ("0" * 40) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)


def test_cli_convert_takes_hub_ids_from_the_cache_offline(authors_file, tiny_dir, marked_no_kv, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    hub_cache(cache, "stabilityai/stable-diffusion-xl-base-1.0", {".": tiny_dir / "sdxl"})
    hub_cache(cache, "h94/IP-Adapter", {"models/image_encoder": tiny_dir / "image_encoder"})
    hub_cache(cache, "rinong/lcm_lookahead", {"encoder_plus_adapter_ckpt.bin": authors_file[1]})
    # No network: huggingface_hub reads these at each call (the environment variables only when it is imported).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    hub = ["convert", "--out", str(tmp_path / "from-hub"), "--sdxl", "hf://stabilityai/stable-diffusion-xl-base-1.0",
           "--image-encoder", "hf://h94/IP-Adapter/models/image_encoder", *MARKED_NO_KV,
           "--checkpoint", "hf://rinong/lcm_lookahead/encoder_plus_adapter_ckpt.bin"]  # fmt: skip
    result = CliRunner().invoke(app, hub)
    assert result.exit_code == 0, result.output
    fingerprints = [model_dir.validate(root).fingerprint() for root in (tmp_path / "from-hub", marked_no_kv)]
    assert fingerprints[0] == fingerprints[1]  # the same conversion

    missing = CliRunner().invoke(app, [*hub[:-1], "hf://rinong/lcm_lookahead/encoder_plus_adapter_no_kv.bin"])
    assert missing.exit_code == 2 and missing.stderr.startswith(
        "error: --checkpoint: cannot fetch hf://rinong/lcm_lookahead/encoder_plus_adapter_no_kv.bin: "
    ), missing.output
