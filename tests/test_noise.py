import pytest
import torch

from lcmla_sdk.noise import draw, draw_per_prompt

SHAPE = (1, 4, 8, 8)


def _expected(seed: int, face_shape: tuple[int, ...], steps: int) -> dict[str, torch.Tensor]:
    """One image's draws in the authors' order, all from one generator: initial noise, the reference's sample, the
    reference's own noise (its latent is of another size here), then each step's noise in fp16."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(SHAPE, generator=g)
    eps, reference = torch.randn(face_shape, generator=g), torch.randn(face_shape, generator=g)
    return {"latents": latents, "eps": eps, "reference": reference,
            "steps": [torch.randn(SHAPE, generator=g, dtype=torch.float16) for _ in range(steps)]}  # fmt: skip


def test_step_noise_drawn_as_the_loop_asks_is_each_generators_draws_in_the_authors_order(tiny, face):
    identity = tiny.encode_face(face)
    face_shape = tuple(identity.latent_mean.shape)  # (1, 4, 16, 16): not the image latents' shape
    noise = draw([3, 5], SHAPE, identity, 3, "paired", 1.0, torch.float16, torch.device("cpu"))
    expected = [_expected(seed, face_shape, 3) for seed in (3, 5)]
    torch.testing.assert_close(noise.latents, torch.cat([e["latents"] for e in expected]).half())
    torch.testing.assert_close(noise.face_noise, torch.cat([e["reference"] for e in expected]).half())
    for index in range(3):
        torch.testing.assert_close(noise.steps(index), torch.cat([e["steps"][index] for e in expected]), rtol=0, atol=0)


def test_step_noise_is_drawn_once_per_step_in_order_and_a_wrong_step_draws_nothing(tiny, face):
    identity = tiny.encode_face(face)
    generator = torch.Generator().manual_seed(9)
    noise = draw([generator], SHAPE, identity, 2, "paired", 1.0, torch.float32, torch.device("cpu"))
    state = generator.get_state()
    with pytest.raises(IndexError, match="step 1 asked for after 0 of 2"):
        noise.steps(1)
    assert torch.equal(generator.get_state(), state)
    noise.steps(0), noise.steps(1)
    with pytest.raises(IndexError, match="step 0 asked for after 2 of 2"):
        noise.steps(0)


def test_images_of_several_identities_draw_each_from_its_own_generator(tiny, face, astronaut):
    identities = [tiny.encode_face(face), tiny.encode_face(astronaut)]
    joined = draw_per_prompt([1, 2, 3, 4], identities, SHAPE, 2, "paired", 1.0, torch.float32, torch.device("cpu"))
    parts = [draw(seeds, SHAPE, identity, 2, "paired", 1.0, torch.float32, torch.device("cpu"))
             for seeds, identity in (([1, 2], identities[0]), ([3, 4], identities[1]))]  # fmt: skip
    torch.testing.assert_close(joined.latents, torch.cat([p.latents for p in parts]), rtol=0, atol=0)
    for index in range(2):
        torch.testing.assert_close(joined.steps(index), torch.cat([p.steps(index) for p in parts]), rtol=0, atol=0)


def test_distinct_generators_drawn_on_threads_give_what_one_loop_over_the_images_gives(tiny, face):
    identity = tiny.encode_face(face)
    face_shape = tuple(identity.latent_mean.shape)

    def generators():
        shared = torch.Generator().manual_seed(11)
        return [shared, torch.Generator().manual_seed(12), shared, torch.Generator().manual_seed(13)]

    noise = draw(generators(), SHAPE, identity, 2, "paired", 1.0, torch.float32, torch.device("cpu"))
    loop = generators()  # shape after shape, image after image: the shared generator is drawn from in turn
    expected = [torch.cat([torch.randn(shape, generator=g) for g in loop]) for shape in (SHAPE, face_shape, face_shape)]
    torch.testing.assert_close(noise.latents, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(noise.face_noise, expected[2], rtol=0, atol=0)
    for index in range(2):
        step = torch.cat([torch.randn(SHAPE, generator=g) for g in loop])
        torch.testing.assert_close(noise.steps(index), step, rtol=0, atol=0)
