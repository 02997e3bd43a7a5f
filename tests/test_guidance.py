import pytest
import torch

from lcmla_sdk.guidance import Guidance, three_branch


@pytest.fixture
def branches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 8, 8, generator=g) for _ in range(4)]  # nokv_u, nokv_c, full_u, full_c


def test_without_full_and_kv_weights_it_is_plain_cfg_on_the_no_kv_branch(branches):
    nokv_u, nokv_c, full_u, full_c = branches
    expected = nokv_u + 4.5 * (nokv_c - nokv_u)
    torch.testing.assert_close(three_branch(*branches, Guidance(4.5, 0.0, 0.0)), expected)


def test_single_weights_select_single_branches(branches):
    nokv_u, nokv_c, full_u, full_c = branches
    torch.testing.assert_close(three_branch(*branches, Guidance(0.0, 0.0, 0.0)), nokv_u)
    torch.testing.assert_close(three_branch(*branches, Guidance(1.0, 0.0, 0.0)), nokv_c)
    torch.testing.assert_close(three_branch(*branches, Guidance(0.0, 1.0, 0.0)), full_c)
    torch.testing.assert_close(three_branch(*branches, Guidance(0.0, 0.0, 1.0)), full_u)


def test_without_kv_the_three_branches_collapse_to_cfg_with_summed_scale(branches):
    nokv_u, nokv_c, _, _ = branches
    collapsed = three_branch(nokv_u, nokv_c, nokv_u, nokv_c, Guidance(3.0, 2.0, 2.0))
    torch.testing.assert_close(collapsed, nokv_u + 5.0 * (nokv_c - nokv_u))


def test_authors_formula_with_defaults(branches):
    u, c, fu, fc = branches
    expected = u + 3.0 * (c - u) + 2.0 * (fc - u) + 2.0 * (fu - u)
    torch.testing.assert_close(three_branch(*branches, Guidance()), expected)


def _latents(model, face, **kwargs):
    return model.generate(face, "a watercolor of a face", seed=3, steps=2, output="latent", **kwargs)


def test_pipeline_with_zero_kv_weights_equals_the_ip_adapter_only_path(tiny, face):
    with_kv = _latents(tiny, face, guidance=(5.0, 0.0, 0.0), use_kv=True)
    without_kv = _latents(tiny, face, guidance=(5.0, 0.0, 0.0), use_kv=False)
    torch.testing.assert_close(with_kv, without_kv, rtol=1e-4, atol=1e-4)


def test_pipeline_without_kv_is_cfg_with_scale_no_kv_plus_full(tiny, face):
    defaults = _latents(tiny, face, use_kv=False)
    cfg5 = _latents(tiny, face, guidance=(5.0, 0.0, 0.0), use_kv=False)
    torch.testing.assert_close(defaults, cfg5, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_latents(tiny, face, use_kv=True), defaults, atol=1e-3)
