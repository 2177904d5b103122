"""Per-image random streams: every random number of image i comes from its own key, so pictures do not depend on the
batch they share or on the device count.

Image i of a call is keyed by fold_in(key(seed), i) (or, with one seed per prompt, image j of prompt p by
fold_in(key(seed[p]), j)). Its initial noise uses that key itself; the other draws fold in a stream number below.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STREAM_IMAGE_LATENTS = 1  # img2img / inpaint: the VAE posterior sample of the image (the upscaler: low-res noise)
STREAM_MASKED_LATENTS = 2  # inpainting UNet: the posterior sample of the masked image
STREAM_STEP = 3  # + call index: the stochastic samplers' step noise
STREAM_TILES = 2**31 - 1  # upscaler tile t: fold_in(fold_in(image key, STREAM_TILES), t)


def image_keys(seed, prompt_index: np.ndarray, index_in_prompt: np.ndarray) -> np.ndarray:
    """Key data (N, 2) of each image: an int seed keys image i by fold_in(key(seed), i); a list of seeds (one per
    prompt) keys image j of prompt p by fold_in(key(seed[p]), j), so a prompt reproduces alone or in a batch."""
    if isinstance(seed, (int, np.integer)):
        index = np.arange(len(prompt_index))
        seeds = np.full(len(prompt_index), int(seed))
    else:
        seeds = np.asarray([int(s) for s in seed])[prompt_index]
        index = index_in_prompt
    make = jax.vmap(lambda s, i: jax.random.key_data(jax.random.fold_in(jax.random.key(s), i)))
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return np.asarray(make(jnp.asarray(seeds, jnp.uint32), jnp.asarray(index, jnp.uint32)))


def _normal(key_data, stream, shape):
    key = jax.random.wrap_key_data(key_data)
    if stream is not None:
        key = jax.random.fold_in(key, stream)
    return jax.random.normal(key, shape, jnp.float32)


def image_noise(key_data: jax.Array, shape, stream=None) -> jax.Array:
    """Per-image standard normal noise, (N, *shape): the same numbers whatever the batch or device count."""
    return jax.vmap(lambda k: _normal(k, stream, shape))(key_data)


def tile_keys(keys: np.ndarray, tile: int) -> np.ndarray:
    """Key data (N, 2) of tile `tile` of every image (the upscaler's multi-tile runs): its own step noise."""
    def one(k):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(k), STREAM_TILES), tile)
        return jax.random.key_data(key)

    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return np.asarray(jax.vmap(one)(jnp.asarray(keys)))
