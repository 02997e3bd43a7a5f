"""Preparing one generation shape ahead of the first real call (``Personalizer.warmup``): compile what is asked,
then generate once from a blank identity of the model's shapes, which captures that shape's sampling step."""

from __future__ import annotations

import logging
from typing import Any

from .cuda_graphs import say_once
from .identity import Identity
from .progress import stages


def blank_identity(model: Any, references: int) -> Identity:
    """An identity of ``model``'s shapes that stands for none (:meth:`Identity.blank`), with ``references`` photos."""
    # The shapes from the components: an exported adapter (use_exported) has no resampler attribute.
    tokens, cross = model.components.resampler.latents.shape[1], model.unet.config.cross_attention_dim
    latent = (model.unet.config.in_channels, model.face_size // model.vae_scale)
    return Identity.blank(references, tokens, cross, *latent, model.fingerprint)


def warm_up(model: Any, graphed: bool, references: int, compile: bool, progress: bool, **call: Any) -> bool:
    """Generate once with ``model`` from a blank identity of ``references`` photos and the ``generate`` keywords
    ``call`` (``mode``, ``num_images``, ``steps``, size, K/V options), which captures the shape's sampling step where
    the loop is ``graphed``; with ``compile``, compile the networks and the VAE decode first, under a progress
    display (``progress``). Neither graphed nor compiling: nothing to do (``False``; else ``True``). The K/V this
    leaves cached are dropped."""
    if compile:
        model.compile_networks()
    elif not graphed:
        say_once("warmup: nothing to capture (the sampling loop runs eagerly here)", logging.INFO)
        return False
    if call["mode"] == "quality" and not call["kv_cache"] and call.get("steps") is None:
        # Without the K/V cache quality mode's K/V-encoder runs inside the step, whatever the step count (a pass ahead
        # needs 2 steps or more: kv_cache.ahead_pays), so one step captures the graph that 50 would, 50 times sooner.
        call["steps"] = 1
    identity = blank_identity(model, references)
    with stages(progress) as stage:
        if compile and not model.decoder.compiled:
            with stage("compiling the VAE decode"):
                model.compile_decoder()
        with stage(f"{'compiling and ' if compile else ''}preparing {call['mode']} x{call['num_images']}"):
            model.generate(identity, "", seed=0, output="latent", **call)
    if call["kv_cache"]:
        model.identity_kv_cache.clear()
    return True
