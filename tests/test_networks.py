import pytest
import torch
from conftest import unet_inputs
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from lcmla_sdk.lora import KV_ENCODER_ADAPTER, LCM_ADAPTER, adapter_state

WIDTHS = {"down_blocks.1": 64, "down_blocks.2": 128, "mid_block": 128, "up_blocks.0": 128, "up_blocks.1": 64}
TOKENS = {"down_blocks.1": 64, "down_blocks.2": 16, "mid_block": 16, "up_blocks.0": 16, "up_blocks.1": 64}


def _zero_kv_encoder_lora(model):
    for name, param in model.unet.named_parameters():
        if ".lora_B.kv_encoder" in name:
            param.data.zero_()


def test_networks_share_every_weight_their_adapters_do_not_change(tiny):
    """One copy of the base weights: a network owns a copy of a layer only where one of its adapters changes it."""
    peft_layers = {name: m for name, m in tiny.unet.named_modules() if isinstance(m, BaseTunerLayer)}
    kv_adapted = {name for name, m in peft_layers.items() if KV_ENCODER_ADAPTER in m.lora_A}
    lcm_adapted = {name for name, m in peft_layers.items() if LCM_ADAPTER in m.lora_A}
    base = {name.replace(".base_layer", ""): p for name, p in tiny.unet.named_parameters() if "lora_" not in name}
    for network, adapted in ((tiny.denoiser, set()), (tiny.kv_encoder, kv_adapted), (tiny.lcm_denoiser, lcm_adapted)):
        params = dict(network.unet.named_parameters())
        assert params.keys() == base.keys()
        for name, param in params.items():
            layer = name.rsplit(".", 1)[0]
            shared = param.data_ptr() == base[name].data_ptr()
            assert shared == (layer not in adapted or not name.endswith("weight")), name
        assert not any(isinstance(m, BaseTunerLayer) for m in network.unet.modules())


@torch.no_grad()
def test_kv_encoder_returns_140_tensors_in_consumption_order_with_face_token_shapes(tiny):
    kv = tiny.kv_encoder(*unet_inputs(tiny, batch=3))
    assert len(kv) == 140
    for index, name in enumerate(tiny.kv_blocks):
        stage = name.split(".attentions")[0]
        for tensor in kv[2 * index : 2 * index + 2]:
            assert tensor.shape == (3, TOKENS[stage], WIDTHS[stage]), name


def _kv_of_the_whole_unet(unet, inputs, capture=None):
    """Every layer's K/V as the whole UNet emits them on its way, and what ``capture`` (a module) was called on."""
    latent, t, text, pooled, ids = inputs
    sink, seen = {}, []
    hook = capture.register_forward_pre_hook(lambda module, args: seen.append(args[0])) if capture else None
    try:
        added = {"text_embeds": pooled, "time_ids": ids}
        unet(latent, t, text, added_cond_kwargs=added, cross_attention_kwargs={"kv_sink": sink})
    finally:
        if hook:
            hook.remove()
    return [tensor for index in range(len(sink)) for tensor in sink[index]], seen


@torch.no_grad()
def test_kv_encoder_stops_at_the_last_kv_projection_with_the_full_runs_kv(tiny):
    calls = []
    unet = tiny.kv_encoder.unet
    stage = unet.up_blocks[1]
    last = stage.attentions[-1].transformer_blocks[-1]
    never = (unet.up_blocks[2], unet.conv_out, stage.upsamplers[0], last.attn1.to_q, last.attn2, last.ff,
             stage.attentions[-1].proj_out)  # fmt: skip
    hooks = [module.register_forward_hook(lambda *a: calls.append(1)) for module in never]
    inputs = unet_inputs(tiny, batch=2)
    try:
        kv = tiny.kv_encoder(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []
    full, (norm1_output,) = _kv_of_the_whole_unet(unet, inputs, capture=last.attn1)
    assert len(full) == len(kv) == 140
    for mine, theirs in zip(kv, full):
        assert torch.equal(mine, theirs)
    # the last layer's K/V are its K/V projections of the block's norm1 output
    assert torch.equal(kv[-2], last.attn1.processor.to_k_kv(norm1_output))
    assert torch.equal(kv[-1], last.attn1.processor.to_v_kv(norm1_output))


@torch.no_grad()
def test_kv_encoder_runs_the_whole_stage_where_diffusers_freeu_is_on(tiny):
    unet = tiny.kv_encoder.unet
    inputs = unet_inputs(tiny, batch=1)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        kv, (full, _) = tiny.kv_encoder(*inputs), _kv_of_the_whole_unet(unet, inputs)
    finally:
        unet.disable_freeu()
    assert not torch.equal(kv[-1], tiny.kv_encoder(*inputs)[-1])  # FreeU changed the last stage's K/V
    for mine, theirs in zip(kv, full):
        assert torch.equal(mine, theirs)


@torch.no_grad()
def test_duplicate_kv_invariant_proves_layer_alignment_and_order(fresh_tiny):
    """With zero LoRA and K/V projections equal to attn1's, the encoder's K/V for the denoiser's own input are
    the denoiser's own K/V; attending over [K;K],[V;V] equals attending over K,V, so eps must not change."""
    model = fresh_tiny
    _zero_kv_encoder_lora(model)
    for name in model.kv_blocks:
        block = model.unet.get_submodule(name)
        block.attn1.processor.to_k_kv.base_layer.weight.copy_(block.attn1.to_k.weight)
        block.attn1.processor.to_v_kv.base_layer.weight.copy_(block.attn1.to_v.weight)
    model.rebuild_networks()
    inputs = unet_inputs(model)
    plain = model.denoiser(*inputs)
    kv = model.kv_encoder(*inputs)
    with_own_kv = model.denoiser(*inputs, kv=kv)
    torch.testing.assert_close(with_own_kv, plain, rtol=1e-4, atol=1e-5)

    # Swapping two same-shaped layers' K/V (down_blocks.2, layers 5 and 6) must break the invariant.
    swapped = list(kv)
    swapped[10:12], swapped[12:14] = kv[12:14], kv[10:12]
    assert (model.denoiser(*inputs, kv=tuple(swapped)) - plain).abs().max() > 1e-3
    # And so must another face latent (the appended tokens then carry different content).
    other = model.kv_encoder(torch.randn_like(inputs[0]), *inputs[1:])
    assert (model.denoiser(*inputs, kv=other) - plain).abs().max() > 1e-3


@torch.no_grad()
def test_kv_encoder_lora_is_seen_by_the_encoder_only(fresh_tiny):
    model = fresh_tiny
    inputs = unet_inputs(model)
    kv_before, eps_before = model.kv_encoder(*inputs), model.denoiser(*inputs)
    for name, param in model.unet.named_parameters():
        if ".lora_B.kv_encoder" in name:
            param.add_(0.05)
    model.rebuild_networks()
    kv_after, eps_after = model.kv_encoder(*inputs), model.denoiser(*inputs)
    assert all(not torch.allclose(a, b) for a, b in zip(kv_before, kv_after))
    torch.testing.assert_close(eps_after, eps_before, rtol=0, atol=0)


@torch.no_grad()
def test_lcm_lora_is_seen_by_the_fast_denoiser_only(fresh_tiny):
    model = fresh_tiny
    inputs = unet_inputs(model)
    kv_before, eps_before, lcm_before = model.kv_encoder(*inputs), model.denoiser(*inputs), model.lcm_denoiser(*inputs)
    assert not torch.allclose(lcm_before, eps_before)
    for name, param in model.unet.named_parameters():
        if ".lora_B.lcm" in name:
            param.mul_(2.0)
    model.rebuild_networks()
    kv_after, eps_after = model.kv_encoder(*inputs), model.denoiser(*inputs)
    assert not torch.allclose(model.lcm_denoiser(*inputs), lcm_before)
    torch.testing.assert_close(eps_after, eps_before, rtol=0, atol=0)
    for before, after in zip(kv_before, kv_after):
        torch.testing.assert_close(after, before, rtol=0, atol=0)


@torch.no_grad()
def test_adapter_scale_is_a_per_sample_runtime_input(tiny):
    inputs = unet_inputs(tiny)
    tokens = torch.randn(2, 16, tiny.unet.config.cross_attention_dim)
    plain = tiny.denoiser(*inputs)
    mixed = tiny.denoiser(*inputs, image_tokens=tokens, adapter_scale=torch.tensor([0.0, 1.0]))
    full = tiny.denoiser(*inputs, image_tokens=tokens, adapter_scale=1.0)
    torch.testing.assert_close(mixed[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], full[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full[1], plain[1])


@torch.no_grad()
def test_image_adapter_unconditional_tokens_come_from_an_all_zero_image(tiny):
    pixels = torch.randn(2, 3, 224, 224)
    cond, uncond = tiny.adapter(pixels)
    assert cond.shape == uncond.shape == (2, 16, tiny.unet.config.cross_attention_dim)
    hidden = tiny.adapter.image_encoder(torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(uncond[:1], tiny.adapter.resampler(hidden), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncond[0], uncond[1])
    assert not torch.allclose(cond[0], cond[1])


def test_processors_refuse_attention_masks(tiny):
    block = tiny.unet.get_submodule(tiny.kv_blocks[0])
    hidden = torch.randn(1, 4, block.attn1.inner_dim)
    with pytest.raises(ValueError, match="plain SDXL attention"):
        block.attn1(hidden, attention_mask=torch.ones(1, 4, 4))


@pytest.mark.parametrize("adapter", [KV_ENCODER_ADAPTER, LCM_ADAPTER])
def test_an_adapters_saved_weights_are_what_peft_would_save(tiny, adapter):
    ours, peft_state = adapter_state(tiny.unet, adapter), get_peft_model_state_dict(tiny.unet, adapter_name=adapter)
    assert list(ours) == list(peft_state) and len(ours) > 100
    for key, value in peft_state.items():
        assert torch.equal(ours[key], value), key
