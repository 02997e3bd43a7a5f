"""One identity per prompt: each prompt's images equal those of a call with that prompt and identity alone."""

from __future__ import annotations

import pytest
import torch
from PIL import ImageOps

from lcmla_sdk import Personalizer

FAST = {"mode": "fast", "steps": 2, "output": "pt"}


@pytest.fixture(scope="module")
def people(tiny, face):
    mirrored = ImageOps.mirror(face)
    return tiny.encode_face(face), tiny.encode_face(mirrored), tiny.encode_face([face, mirrored])


def rows_equal_alone(model: Personalizer, identities, atol: float = 2e-3, **options) -> None:
    prompts = [f"a portrait {i}" for i in range(len(identities))]
    seeds = [11 + 2 * i for i in range(len(identities))]
    together = model.generate(identities, prompts, seed=seeds, **options)
    for i, identity in enumerate(identities):
        alone = model.generate(identity, prompts[i], seed=seeds[i], **options)
        torch.testing.assert_close(together[i : i + 1], alone, atol=atol, rtol=0)


@pytest.mark.parametrize("options", [
    {**FAST}, {**FAST, "kv_cache": True}, {**FAST, "use_kv": False}, {"mode": "quality", "steps": 2, "output": "pt"},
], ids=["fast", "fast-kv-cache", "no-kv", "quality"])  # fmt: skip
def test_each_prompt_row_equals_its_call_alone(tiny, people, options):
    first, second, _ = people
    rows_equal_alone(tiny, [first, second, first], **options)


def test_people_differ_and_references_must_match(tiny, people, face):
    first, second, both = people
    images = tiny.generate([first, second], ["a", "a"], seed=[3, 3], **FAST)
    assert not torch.equal(images[0], images[1]), "each prompt's identity reaches its images"
    with pytest.raises(ValueError, match="^face: .*reference photos"):
        tiny.generate([first, both], ["a", "b"], seed=0, **FAST)
    with pytest.raises(ValueError, match="^face: 2 faces for 3 prompts"):
        tiny.generate([first, second], ["a", "b", "c"], seed=0, **FAST)
    photos = tiny.generate([[face], [ImageOps.mirror(face)]], ["a", "a"], seed=[3, 3], **FAST)
    torch.testing.assert_close(photos, images, atol=2e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_graphs", [True, False])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_each_prompt_row_equals_its_call_alone_on_gpu(face, cuda_graphs, kv_cache):
    model = Personalizer.from_pretrained("tiny", device="cuda", cuda_graphs=cuda_graphs)
    people = [model.encode_face(face), model.encode_face(ImageOps.mirror(face))]
    # fp16 kernels differ with the batch size: a looser bound than on the CPU.
    rows_equal_alone(model, [people[0], people[1], people[0]], atol=1e-2, **FAST, kv_cache=kv_cache)
    rows_equal_alone(model, people, atol=1e-2, mode="quality", steps=3, output="pt")
