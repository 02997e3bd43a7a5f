import json
from importlib import resources

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.upsampling import Upsample2D

from lcmla_sdk.attention import AppendedKVAttnProcessor, IPAdapterAttnProcessor, WideHeadAttnProcessor
from lcmla_sdk.decoding import Decoder, decode_network
from lcmla_sdk.upsampling import PhaseUpsample2D, install_phase_upsampling
from lcmla_sdk.wiring import kv_block_names


def authors_70_blocks() -> list[str]:
    """The authors' injection list (down_blocks.1/2, mid_block, up_blocks.0/1), in forward order."""
    layout = [("down_blocks.1", 2, 2), ("down_blocks.2", 2, 10), ("mid_block", 1, 10), ("up_blocks.0", 3, 10),
              ("up_blocks.1", 3, 2)]  # fmt: skip
    return [
        f"{stage}.attentions.{a}.transformer_blocks.{b}" for stage, attentions, depth in layout
        for a in range(attentions) for b in range(depth)
    ]  # fmt: skip


def test_full_size_sdxl_has_the_authors_70_blocks_in_order():
    config = json.loads(resources.files("lcmla_sdk.presets").joinpath("sdxl.json").read_text())["unet"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    names = kv_block_names(unet)
    assert len(names) == 70
    assert names == authors_70_blocks()


def test_tiny_preset_keeps_the_sdxl_layer_pattern(tiny):
    assert tiny.kv_blocks == authors_70_blocks()
    for index, name in enumerate(tiny.kv_blocks):
        block = tiny.unet.get_submodule(name)
        assert isinstance(block.attn1.processor, AppendedKVAttnProcessor)
        assert block.attn1.processor.layer_index == index
        assert isinstance(block.attn2.processor, IPAdapterAttnProcessor)


@pytest.mark.parametrize("size", [(5, 7), (1, 1), (8, 8)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "compiling"])
def test_upsampling_by_phases_equals_nearest_upsampling_then_the_convolution(size, bias, compiling, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)  # both ways of interleaving the phases
    torch.manual_seed(0)
    upsample = Upsample2D(6, use_conv=True, out_channels=5, bias=bias)
    x = torch.randn(2, 6, *size)
    phases = PhaseUpsample2D(upsample)
    assert phases.conv is upsample.conv  # the same weights, under the same state-dict key
    torch.testing.assert_close(phases(x), upsample(x), rtol=0, atol=1e-5)
    odd = (2 * size[0] + 1, 2 * size[1])  # a size other than twice the input: diffusers' own way
    torch.testing.assert_close(phases(x, odd), upsample(x, odd), rtol=0, atol=0)
    twice = (2 * size[0], 2 * size[1])  # asked for explicitly: by phases
    torch.testing.assert_close(phases(x, twice), upsample(x, twice), rtol=0, atol=1e-5)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(phases(channels_last), upsample(x), rtol=0, atol=1e-5)
    if not compiling:  # eager, off CUDA, keeps the layout, as diffusers' upsampling does
        assert phases(channels_last).is_contiguous(memory_format=torch.channels_last)


def test_only_nearest_upsampling_with_a_plain_3x3_convolution_is_rewritten():
    module = torch.nn.ModuleDict({"plain": Upsample2D(4, use_conv=True), "no_conv": Upsample2D(4),
                                  "transposed": Upsample2D(4, use_conv_transpose=True),
                                  "wide": Upsample2D(4, use_conv=True, kernel_size=5, padding=2)})  # fmt: skip
    assert install_phase_upsampling(module) == 1
    assert [type(m).__name__ for m in module.values()] == ["PhaseUpsample2D", "Upsample2D", "Upsample2D", "Upsample2D"]
    with pytest.raises(ValueError, match="only a nearest 2x upsampling"):
        PhaseUpsample2D(module["transposed"])


def test_the_decode_network_equals_the_vaes_own_decode_and_leaves_the_vae_untouched(tiny, monkeypatch):
    vae = tiny.vae
    network = decode_network(vae)
    kinds = {type(m).__name__ for m in network.modules()}
    assert "PhaseUpsample2D" in kinds and "Upsample2D" not in kinds
    assert {type(m).__name__ for m in vae.modules()} >= {"Upsample2D"}  # diffusers' decode as it was
    assert type(vae.decoder.mid_block.attentions[0].processor) is not WideHeadAttnProcessor
    assert {p.data_ptr() for p in network.parameters()} == {p.data_ptr() for p in vae.parameters()}
    latents = torch.randn(2, vae.config.latent_channels, 9, 11, generator=torch.Generator().manual_seed(1),
                          dtype=vae.dtype)  # fmt: skip
    with torch.inference_mode():
        expected = vae.decode(latents).sample
        torch.testing.assert_close(network(latents), expected, rtol=0, atol=1e-4)
        monkeypatch.setattr(WideHeadAttnProcessor, "MAX_SCORES", 4 * 99)  # chunks of 4 query rows, the last of 3
        torch.testing.assert_close(network(latents), expected, rtol=0, atol=1e-4)


def test_wide_head_attention_refuses_what_it_does_not_compute(tiny):
    attention = decode_network(tiny.vae).vae.decoder.mid_block.attentions[0]
    x = torch.randn(1, attention.to_q.in_features, 3, 3, dtype=tiny.vae.dtype)
    with pytest.raises(ValueError, match="plain self-attention over a feature map"):
        attention(x.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("heads, group_norm, residual, rescale", [(1, True, True, 1.0), (4, False, False, 2.0),
                                                                  (2, True, False, 0.5)])  # fmt: skip
def test_wide_head_attention_equals_diffusers_attention(heads, group_norm, residual, rescale, monkeypatch):
    torch.manual_seed(0)
    attention = Attention(16, heads=heads, dim_head=16 // heads, norm_num_groups=4 if group_norm else None,
                          residual_connection=residual, rescale_output_factor=rescale, bias=True)  # fmt: skip
    x = torch.randn(2, 16, 5, 7)
    expected = AttnProcessor2_0()(attention, x)
    monkeypatch.setattr(WideHeadAttnProcessor, "MAX_SCORES", 35 * 6)  # chunks of 6 query rows
    torch.testing.assert_close(WideHeadAttnProcessor()(attention, x), expected, rtol=0, atol=1e-5)


def test_tiling_or_slicing_asked_of_the_vae_decode_its_own_way(tiny, monkeypatch):
    decoder = Decoder(tiny.vae, None)
    monkeypatch.setattr(decoder, "network", lambda latents: pytest.fail("the decode network ignored vae.use_slicing"))
    monkeypatch.setattr(tiny.vae, "use_slicing", True)
    latents = torch.randn(2, 4, 8, 8, dtype=tiny.vae.dtype)
    with torch.inference_mode():
        expected = tiny.vae.decode(latents / tiny.vae.config.scaling_factor).sample
        torch.testing.assert_close(decoder(latents, "pt"), (expected.float().clamp(-1, 1) + 1) / 2, rtol=0, atol=0)
