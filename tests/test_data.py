"""lcmla data, its parts: descriptions, the plan's names and seeds, anchor-shared attention, the face check."""

import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image, ImageOps

from lcmla_sdk.data import PlanOptions, Shard, generate_descriptions, load_turbo, read_identities
from lcmla_sdk.data.consistency import DISAGREES, NO_FACE, TOO_FEW, AnchorAttnProcessor, anchor_arguments, check_identity
from lcmla_sdk.data.descriptions import COVERS_HAIR, FACIAL_HAIR, IdentityListError, generated_identities
from lcmla_sdk.data.plan import STYLES, image_jobs
from lcmla_sdk.train.data import prompt_from_filename


def test_a_hundred_thousand_distinct_descriptions_reproducible_and_stable_as_the_list_grows():
    many = generate_descriptions(100_000, seed=3)
    assert len(set(many)) == 100_000
    assert generate_descriptions(1000, seed=3) == many[:1000]  # a larger run keeps the first identities
    assert generate_descriptions(1000, seed=4) != many[:1000]
    for description in many[:5000]:  # combinations that read naturally
        words = f" {description} "
        assert description.startswith(("a ", "an ")) and "  " not in description
        if " woman " in words or " androgynous person " in words:
            assert not any(beard and beard in description for beard in FACIAL_HAIR)
        if any(cover in description for cover in COVERS_HAIR):
            assert " hair" not in description and "cut" not in description
        assert "petite" not in description or " man " not in words
    assert "an 80-year-old" in " ".join(many) and "a 80-year-old" not in " ".join(many)


def test_a_users_list_from_text_csv_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("# people\nan old man with curly hair and a moustache\n\na young woman\n")
    (tmp_path / "a.csv").write_text('name,description\nbob,"an old man, curly hair"\n,a young woman\n')
    (tmp_path / "a.jsonl").write_text('{"description": "an old man"}\n{"description": "a child", "name": "kid"}\n')
    text = read_identities(tmp_path / "a.txt")
    assert [(i.index, i.folder, i.description) for i in text] == [
        (0, "identity_0000000", "an old man with curly hair and a moustache"), (1, "identity_0000001", "a young woman")]
    assert [(i.folder, i.description) for i in read_identities(tmp_path / "a.csv")] == [
        ("bob", "an old man, curly hair"), ("identity_0000001", "a young woman")]
    assert [i.folder for i in read_identities(tmp_path / "a.jsonl")] == ["identity_0000000", "kid"]

    (tmp_path / "dup.txt").write_text("a man\na woman\na man\n")
    with pytest.raises(IdentityListError, match=r"dup.txt line 3: the same description as line 1"):
        read_identities(tmp_path / "dup.txt")
    (tmp_path / "bad.jsonl").write_text('{"description": "a man", "name": "../up"}\n')
    with pytest.raises(IdentityListError, match=r"bad.jsonl line 1: name '../up' is not a folder name"):
        read_identities(tmp_path / "bad.jsonl")
    (tmp_path / "x.csv").write_text("who\nbob\n")
    with pytest.raises(IdentityListError, match="'description' column"):
        read_identities(tmp_path / "x.csv")
    with pytest.raises(IdentityListError, match=r"a\.json: expected a number, or a \.txt, \.csv or \.jsonl file"):
        read_identities(tmp_path / "a.json")


def test_names_follow_the_authors_and_the_trainer_reads_the_prompts_back():
    identity = generated_identities(1)[0]
    jobs = image_jobs(identity, PlanOptions(per_identity=3, per_style=2))
    assert len(jobs) == 3 + 2 * len(STYLES) and len({job.relative for job in jobs}) == len(jobs)
    photo, oil = jobs[0], [job for job in jobs if "oil" in job.relative][0]
    assert photo.relative == f"identity_0000000/vanilla/A_photo_of_conceptname_{photo.seed}.jpg"
    assert photo.prompt == f"A photo of {identity.description}"
    assert oil.relative == f"identity_0000000/stylized/An_oil_painting_of_conceptname_{oil.seed}.jpg"
    read_back = {prompt_from_filename(job.relative, "face") for job in jobs}
    assert read_back == {"A photo of face", "A colorful graffiti of face", "A pencil drawing of face",
                         "A watercolor painting of face", "A drawing of face in a comic book", "An oil painting of face"}
    # An image's seed depends on its identity and slot only: more images per identity keep the first ones.
    more = image_jobs(identity, PlanOptions(per_identity=5, per_style=3, styles=("oil",)))
    assert [j.seed for j in more[:3]] == [j.seed for j in jobs[:3]]
    assert [j.anchor for j in image_jobs(identity, PlanOptions(consistent=("attention",), anchors=2))] == [True, True] + [False] * 8
    shards = [Shard.parse(f"{i}/3").select(generated_identities(10)) for i in range(3)]
    assert sorted(i.index for s in shards for i in s) == list(range(10))
    for text in ("3/3", "a/2", "1"):
        with pytest.raises(ValueError, match="shard: expected I/N"):
            Shard.parse(text)
    with pytest.raises(ValueError, match="styles"):
        PlanOptions(styles=("cubism",))
    with pytest.raises(ValueError, match="faces: the filter needs a face backend"):
        PlanOptions(consistent=("filter",))


@pytest.fixture(scope="module")
def unet():
    return load_turbo("tiny").unet


def unet_call(unet, rows, anchors=None):
    """The tiny UNet on per-row random latents (row i always gets the same latent and text)."""
    latents = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(r)) for r in rows])
    text = torch.stack([torch.randn(5, 96, generator=torch.Generator().manual_seed(100 + r)) for r in rows])
    added = {"text_embeds": torch.zeros(len(rows), 64), "time_ids": torch.zeros(len(rows), 6)}
    kwargs = anchor_arguments(anchors, torch.device("cpu")) if anchors else None
    with torch.no_grad():
        return unet(latents, 999, text, added_cond_kwargs=added, cross_attention_kwargs=kwargs).sample


def test_a_random_turbo_is_drawn_on_a_device_other_than_the_cpu():
    # Its weights are drawn under a default device; the scheduler's tables go through numpy, which a GPU (or here the
    # meta device) as default device breaks: the H100 run of benchmarks/data_gen.py failed so before this was fixed.
    pipe = load_turbo("tiny", device="meta")
    assert pipe.unet.device.type == "meta" and pipe.scheduler.sigmas.device.type == "cpu"


def test_anchor_attention_makes_an_image_depend_on_its_seed_and_its_anchors_only(unet):
    unet.set_attn_processor(AttnProcessor2_0())
    plain = unet_call(unet, [0, 1, 2, 3])
    unet.set_attn_processor(AnchorAttnProcessor())
    assert torch.allclose(unet_call(unet, [0, 1, 2, 3]), plain, atol=1e-5)  # no anchors: diffusers' attention
    # Rows 0, 1 anchor rows 2, 3; a second identity (rows 4..6) with its own anchors 4, 5 shares the batch.
    shared = unet_call(unet, [0, 1, 2, 3, 10, 11, 12], [(4, [0, 1]), (3, [4, 5])])
    assert not torch.allclose(shared[2:4], plain[2:4], atol=1e-3)  # the anchors act on the others
    # Row 3 alone with its anchors (a resumed run that lacks only it) comes out the same, as does identity 2 alone.
    assert torch.allclose(unet_call(unet, [0, 1, 3], [(3, [0, 1])]), shared[[0, 1, 3]], atol=1e-5)
    assert torch.allclose(unet_call(unet, [10, 11, 12], [(3, [0, 1])]), shared[4:], atol=1e-5)
    # Anchors see only each other: without the members they are unchanged.
    assert torch.allclose(unet_call(unet, [0, 1], [(2, [0, 1])]), shared[:2], atol=1e-5)


def test_the_face_filter_on_real_photos_keeps_agreeing_faces_and_says_why_it_drops(face):
    pytest.importorskip("dlib", reason="the dlib backend needs the [faces] extra")
    skimage_data = pytest.importorskip("skimage.data")
    from lcmla_sdk.faces import DlibFaceAnalyzer

    analyzer = DlibFaceAnalyzer(detector="cnn", upsample=0)  # the cameraman's turned face needs the CNN
    astronaut = Image.fromarray(skimage_data.astronaut()).crop((100, 0, 356, 256))
    photos = {"face": face, "mirror": ImageOps.mirror(face), "astronaut": astronaut,
              "cameraman": Image.fromarray(skimage_data.camera()).convert("RGB").crop((128, 0, 384, 256)),
              "coffee": Image.fromarray(skimage_data.coffee()).crop((0, 0, 256, 256))}  # fmt: skip
    checked = check_identity(analyzer, photos, ["style"], threshold=0.92, filtering=True)
    assert checked.dropped == {"cameraman": DISAGREES, "coffee": NO_FACE}
    assert checked.faces == 4 and 0.8 < checked.within < 0.97
    assert np.isclose(np.linalg.norm(checked.embedding), 1.0, atol=1e-4)
    measured = check_identity(analyzer, photos, ["style"], threshold=0.92, filtering=False)
    assert measured.dropped == {} and measured.within == checked.within
    alone = check_identity(analyzer, {"face": face, "coffee": photos["coffee"]}, ["style"], 0.92, filtering=True)
    assert alone.dropped == {"face": TOO_FEW, "coffee": NO_FACE, "style": TOO_FEW}
