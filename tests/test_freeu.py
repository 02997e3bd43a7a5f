"""FreeU on the denoiser, checked against FreeU's own arithmetic (FFT filter, backbone scaling) as the authors run it."""

import pytest
import torch
from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D

from lcmla_sdk.freeu import AUTHORS_FREEU, FreeUCrossAttnUpBlock2D, fourier_filter


def authors_fourier_filter(x: torch.Tensor, scale: float) -> torch.Tensor:
    """FreeU's filter as published (threshold 1): FFT, shift, scale the centre, shift back, inverse FFT, real part."""
    x_freq = torch.fft.fftshift(torch.fft.fftn(x.double(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones_like(x_freq.real)
    crow, ccol = x.shape[-2] // 2, x.shape[-1] // 2
    mask[..., crow - 1 : crow + 1, ccol - 1 : ccol + 1] = scale
    x_freq = torch.fft.ifftshift(x_freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(x_freq, dim=(-2, -1)).real.to(x.dtype)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 16, 16), (1, 2, 7, 9), (1, 1, 64, 64)])
@pytest.mark.parametrize("scale", [0.2, 0.9, 1.0, 1.5])
def test_fourier_filter_equals_the_fft_formula(shape, scale):
    x = torch.randn(shape)
    torch.testing.assert_close(fourier_filter(x, torch.tensor(scale)), authors_fourier_filter(x, scale), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_freeu_block_equals_freeu_by_hand(tiny):
    block = tiny.denoiser.unet.up_blocks[1]
    assert isinstance(block, FreeUCrossAttnUpBlock2D) and block.resolution_idx == 1
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, block.resnets[0].in_channels - 64, 8, 8, generator=g)  # 128 backbone + 64 skip channels
    skips = tuple(torch.randn(1, c, 8, 8, generator=g) for c in (32, 64, 64))  # popped last first
    temb = torch.randn(1, block.resnets[0].time_emb_proj.in_features, generator=g)
    text = torch.randn(1, 77, tiny.unet.config.cross_attention_dim, generator=g)
    b, s = 1.3, 0.4
    got = block(hidden, skips, temb, text, cross_attention_kwargs={"freeu": torch.tensor([b, s])})

    expected, remaining = hidden, skips
    for resnet, attn in zip(block.resnets, block.attentions):
        skip, remaining = remaining[-1], remaining[:-1]
        half = expected.shape[1] // 2
        expected = expected.clone()
        expected[:, :half] = expected[:, :half] * b
        skip = authors_fourier_filter(skip, s)
        expected = attn(resnet(torch.cat([expected, skip], dim=1), temb), encoder_hidden_states=text, return_dict=False)[0]
    expected = block.upsamplers[0](expected)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    plain = block(hidden, skips, temb, text)
    assert (plain - got).abs().max() > 1e-3


def test_only_the_denoisers_second_up_stage_has_freeu(tiny):
    for network in (tiny.denoiser, tiny.lcm_denoiser):
        kinds = [type(block) for block in network.unet.up_blocks]
        assert kinds[1] is FreeUCrossAttnUpBlock2D and FreeUCrossAttnUpBlock2D not in kinds[:1] + kinds[2:]
    for unet in (tiny.kv_encoder.unet, tiny.unet):
        assert all(type(block) is not FreeUCrossAttnUpBlock2D for block in unet.up_blocks)
        assert isinstance(unet.up_blocks[1], CrossAttnUpBlock2D)


def test_freeu_is_on_by_default_with_the_authors_values_and_can_be_turned_off(tiny, face):
    identity = tiny.encode_face(face)
    kwargs = {"seed": 2, "steps": 2, "output": "latent"}
    default = tiny.generate(identity, "a face", **kwargs)
    torch.testing.assert_close(default, tiny.generate(identity, "a face", freeu=AUTHORS_FREEU, **kwargs), rtol=0, atol=0)
    off = tiny.generate(identity, "a face", freeu=None, **kwargs)
    assert (default - off).abs().max() > 1e-4
    # b2 = s2 = 1 is exactly no FreeU; b1 and s1 act on a stage the authors' code never changes.
    neutral = tiny.generate(identity, "a face", freeu=(5.0, 1.0, 0.1, 1.0), **kwargs)
    torch.testing.assert_close(neutral, off, rtol=0, atol=0)


@pytest.mark.parametrize("freeu", [(1.0, 1.1), (1.0, float("nan"), 0.9, 0.2), (1.0, -1.1, 0.9, 0.2)])
def test_bad_freeu_values_are_refused(tiny, face, freeu):
    with pytest.raises(ValueError, match="^freeu:"):
        tiny.generate(face, "a face", steps=1, freeu=freeu)
