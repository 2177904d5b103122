"""Rank images by how well they match a prompt with CLIP, as DALL-E mini and the Stable Diffusion notebooks do.

`preprocess` reproduces transformers' CLIP image processor (`CLIPImageProcessorPil`) in numpy + PIL, without torch:
RGB conversion (transparency onto white), PIL resize of the shortest side, center crop, rescale, normalize.
`CLIPReranker.score` is the matching entry of transformers' `CLIPModel(...).logits_per_image`,
exp(logit_scale) * cosine(image embedding, text embedding), for each (image, its prompt). Scoring runs in one jitted
function whose batch is sharded over the `data` axis of a mesh, as generation is.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdjax.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, unit_norm

PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, transformers' default for CLIP


# ----------------------------------------------------------------------------------------------------------------
# Image preprocessing


@dataclasses.dataclass(frozen=True)
class CLIPImageProcessorConfig:
    """transformers' CLIP `preprocessor_config.json`: what `preprocess` takes.

    size: int = resize the shortest side to it (aspect kept), or (height, width) = resize to exactly that;
    crop: int or (height, width) of the center crop.
    """

    size: int | tuple[int, int] = 224
    crop: int | tuple[int, int] = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = PIL_BICUBIC
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPImageProcessorConfig":
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(flag, True) is not True:
                raise ValueError(f"preprocessor config: {flag}={d[flag]!r} is not supported (CLIP sets it true)")
        kw = {}
        if "size" in d:
            kw["size"] = _size(d["size"], "size")
        if "crop_size" in d:
            crop = _size(d["crop_size"], "crop_size")
            kw["crop"] = crop if isinstance(crop, tuple) else (crop, crop)  # a bare int crop is square
        for key, name in (("image_mean", "mean"), ("image_std", "std")):
            if key in d:
                kw[name] = tuple(float(v) for v in d[key])
        if "resample" in d:
            kw["resample"] = int(d["resample"])
        if "rescale_factor" in d:
            kw["rescale_factor"] = float(d["rescale_factor"])
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, image_size: int | None = None) -> "CLIPImageProcessorConfig":
        """Read `folder/preprocessor_config.json`; without one, resize and crop to `image_size` (the vision
        model's input size; default 224) with the OpenAI mean and std."""
        file = Path(folder) / "preprocessor_config.json"
        if not file.is_file():
            size = 224 if image_size is None else int(image_size)
            return cls(size=size, crop=size)
        try:
            return cls.from_dict(json.loads(file.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None

    @property
    def crop_hw(self) -> tuple[int, int]:
        return self.crop if isinstance(self.crop, tuple) else (self.crop, self.crop)


def _size(value, name) -> int | tuple[int, int]:
    """transformers' size forms -> int (shortest edge) or (height, width)."""
    if isinstance(value, int):  # old feature-extractor configs: "size": 224 means the shortest edge for CLIP
        return value
    if isinstance(value, dict):
        if set(value) == {"shortest_edge"}:
            return int(value["shortest_edge"])
        if set(value) == {"height", "width"}:
            return int(value["height"]), int(value["width"])
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"preprocessor config: unsupported {name} {value!r} (expected an int, {{'shortest_edge': n}} "
                     "or {'height': h, 'width': w})")


def _as_list(images) -> list:
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (np.ndarray, jax.Array)):
        images = np.asarray(images)
        if images.ndim == 3:
            return [images]
        if images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C) or (H, W, C), got shape {images.shape}")
    images = list(images)
    if not images:
        raise ValueError("no images given")
    return images


def _rgb_uint8(image) -> np.ndarray:
    """One PIL image or (H, W, C) array -> (H, W, 3) uint8, as transformers turns it into the PIL image it resizes.

    PIL: transparency is composited onto white. uint8 arrays: used as they are. Float arrays in [0, 1]: cast as
    transformers' `to_pil_image` does, x * 255 in float64, then float32, then truncated to uint8 (the values it
    produces with `do_rescale=False`; with its default `do_rescale=True` it would rescale twice).
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image array must be (H, W, C) channels-last with C in 1, 3, 4; got shape {a.shape}")
    floating = np.issubdtype(a.dtype, np.floating)
    if floating:
        if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
            raise ValueError(f"float images must lie in [0, 1]; got values in [{a.min()}, {a.max()}]")
    elif a.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 or float in [0, 1], got {a.dtype}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:  # onto white, in the array's own dtype (transformers' convert_to_rgb)
        white = 1.0 if floating else 255
        alpha = a[..., 3:4] / white
        rgb = alpha * a[..., :3] + (1 - alpha) * white
        a = rgb.astype(a.dtype) if floating else np.round(rgb).astype(np.uint8)
    if floating:
        a = (a.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    return a


def _resize_hw(h: int, w: int, size) -> tuple[int, int]:
    if isinstance(size, tuple):
        return size
    # transformers' get_resize_output_image_size(default_to_square=False): the long side is truncated, not rounded
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def _center_crop(a: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """transformers' center_crop: offsets floor((side - crop) / 2); an image smaller than the crop is zero-padded,
    centred with the extra pixel of an odd difference at the top / left."""
    h, w = a.shape[:2]
    nh, nw = max(ch, h), max(cw, w)
    if (nh, nw) != (h, w):
        top_pad, left_pad = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
        padded = np.zeros((nh, nw, a.shape[2]), a.dtype)
        padded[top_pad:top_pad + h, left_pad:left_pad + w] = a
        top, left = (h - ch) // 2 + top_pad, (w - cw) // 2 + left_pad
        return padded[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]
    top, left = (h - ch) // 2, (w - cw) // 2
    return a[top:top + ch, left:left + cw]


def preprocess(
    images,
    size: int | tuple[int, int] = 224,
    crop: int | tuple[int, int] = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    resample: int = PIL_BICUBIC,
    rescale_factor: float = 1 / 255,
) -> np.ndarray:
    """Images -> CLIP pixel values (B, crop, crop, 3) float32, NHWC, equal to transformers' CLIP image processor.

    images: a PIL image, a list of PIL images or (H, W, C) arrays, or an (N, H, W, C) array; arrays are uint8 or
    float in [0, 1] (C = 1, 3 or 4). Steps, in transformers' order: RGB; resize (PIL, on uint8) of the shortest side
    to `size` (or to (height, width) when `size` is a pair); center crop; x * rescale_factor in float64, then
    float32; (x - mean) / std in float32.
    """
    from PIL import Image

    ch, cw = crop if isinstance(crop, tuple) else (crop, crop)
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    out = []
    for image in _as_list(images):
        a = _rgb_uint8(image)
        nh, nw = _resize_hw(a.shape[0], a.shape[1], size)
        a = np.asarray(Image.fromarray(a).resize((nw, nh), resample=resample))
        a = _center_crop(a, ch, cw)
        x = (a.astype(np.float64) * rescale_factor).astype(np.float32)
        out.append((x - mean32) / std32)
    return np.stack(out)


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def _score(state, ids, mask, pixels, *, graphdef):
    """(B, L) ids + mask, (B, H, W, 3) pixels -> (B,) exp(logit_scale) * cosine(image i, text i), float32."""
    model = nnx.merge(graphdef, state)
    text = unit_norm(model.get_text_features(ids, mask).astype(jnp.float32))
    image = unit_norm(model.get_image_features(pixels).astype(jnp.float32))
    scale = jnp.exp(model.logit_scale.get_value().astype(jnp.float32))
    return jnp.sum(text * image, axis=-1) * scale


class CLIPReranker:
    """Score and rank images against prompts with a CLIP model (transformers `CLIPModel` checkpoint).

    The weights are replicated over `mesh` (default: all devices, axis `data`); each batch of images is padded to
    a multiple of the device count, split over `data`, and cut back.
    """

    def __init__(self, *, model, tokenizer, image_processing: CLIPImageProcessorConfig, mesh: Mesh | None = None):
        from sdjax.distributed import data_mesh

        self.model = model
        self.tokenizer = tokenizer
        self.image_processing = image_processing
        self.mesh = mesh or data_mesh()
        image_size = model.config.vision_config.image_size
        if image_processing.crop_hw != (image_size, image_size):
            raise ValueError(f"the image processor crops to {image_processing.crop_hw}; the vision model takes "
                             f"{image_size}x{image_size}")
        self._replicated = NamedSharding(self.mesh, P())
        self._batched = NamedSharding(self.mesh, P("data"))
        nnx.update(model, jax.device_put(nnx.state(model), self._replicated))
        # one program; jit keeps one executable per batch shape
        self._score_fn = jax.jit(
            functools.partial(_score, graphdef=nnx.graphdef(model)),
            in_shardings=(self._replicated, self._batched, self._batched, self._batched),
            out_shardings=self._batched,
        )

    @classmethod
    def from_pretrained(cls, path, dtype=jnp.float32, mesh: Mesh | None = None) -> "CLIPReranker":
        """A transformers `CLIPModel` folder: config.json + model.safetensors, optional tokenizer files (else the
        packaged CLIP tokenizer) and preprocessor_config.json (else resize and crop to the vision input size)."""
        from sdjax.loading import resolve_path
        from sdjax.models.clip import CLIPModel
        from sdjax.distributed import data_mesh
        from sdjax.tokenizer import Tokenizer

        folder = resolve_path(path)
        mesh = mesh or data_mesh()
        model = CLIPModel.from_pretrained(folder, dtype=dtype, sharding=NamedSharding(mesh, P()))
        has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
        tokenizer = Tokenizer.from_pretrained(folder if has_tokenizer else None)
        processing = CLIPImageProcessorConfig.from_pretrained(folder, model.config.vision_config.image_size)
        return cls(model=model, tokenizer=tokenizer, image_processing=processing, mesh=mesh)

    def preprocess(self, images) -> np.ndarray:
        """Images (see `preprocess`) -> (B, H, W, 3) float32 pixels for this model."""
        return preprocess(images, **dataclasses.asdict(self.image_processing))

    def score(self, images, prompts: str | Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """CLIP scores (n_images,) float32: exp(logit_scale) * cosine similarity of image i and its prompt, i.e.
        transformers' `CLIPModel(...).logits_per_image[i, j]` where prompt j is image i's.

        images: as `preprocess` takes them (PIL images, or arrays in [0, 1] or uint8; not preprocessed pixels).
        prompts: one string for all images, or one per image. batch_size: images per device call (rounded up to a
        multiple of the device count; default all at once); every call of one size reuses one compiled program.
        Unlike the pipelines (`sdjax.prompts`), the reranker keeps CLIP's 77-token limit: a longer prompt is cut
        (with a warning) and scored on its first 75 tokens; the text is read literally (`prompts.plain_text` removes
        A1111 syntax first).
        """
        images = _as_list(images)
        n = len(images)
        if isinstance(prompts, str):
            prompts = [prompts] * n
        prompts = list(prompts)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} images: give one prompt, or one per image")
        n_dev = self.mesh.devices.size
        batch = n if batch_size is None else min(int(batch_size), n)
        if batch < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        batch = -(-batch // n_dev) * n_dev
        max_length = self.model.config.text_config.max_position_embeddings
        state = nnx.state(self.model)
        scores = []
        for start in range(0, n, batch):
            chunk = slice(start, min(start + batch, n))
            ids, mask = self.tokenizer(prompts[chunk], max_length=max_length)
            pixels = self.preprocess(images[chunk])
            m = len(ids)

            def pad(x):  # repeat the last item to fill the batch; cut back after
                return np.concatenate([x, np.repeat(x[-1:], batch - m, axis=0)]) if batch > m else x

            out = self._score_fn(state, *(jax.device_put(pad(x), self._batched) for x in (ids, mask, pixels)))
            scores.append(np.asarray(jax.device_get(out))[:m])
        return np.concatenate(scores).astype(np.float32)

    def rank(self, images, prompt: str | Sequence[str], k: int | None = None,
             batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k best images for `prompt` (one string, or one per image): (indices (k,), scores (k,)), best first;
        equal scores keep their input order. k=None ranks all images."""
        images = _as_list(images)
        n = len(images)
        k = n if k is None else k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise ValueError(f"k={k!r} must be an integer between 1 and the number of images ({n})")
        scores = self.score(images, prompt, batch_size=batch_size)
        order = np.argsort(-scores, kind="stable")[:k]
        return order, scores[order]


__all__ = ["CLIPImageProcessorConfig", "CLIPReranker", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "preprocess"]
