import json
from importlib import resources

import torch
from diffusers import UNet2DConditionModel

from lcmla_sdk.attention import AppendedKVAttnProcessor, IPAdapterAttnProcessor
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
