"""Host-side image helpers of the pipelines: PIL images, paths and arrays in, normalised float arrays out."""
from __future__ import annotations

import jax
import numpy as np


def to_list(x):
    """None -> None; a string -> [it]; any other iterable -> a list."""
    if x is None:
        return None
    if isinstance(x, str):
        return [x]
    return list(x)


def is_latents(image, latent_channels: int) -> bool:
    """An img2img `image` given as latents: an (B, h, w, C) array with C the VAE's latent channels."""
    return (isinstance(image, (np.ndarray, jax.Array)) and np.ndim(image) == 4 and latent_channels != 3
            and image.shape[-1] == latent_channels)


def per_image(x: np.ndarray, n_prompts: int, prompt_index: np.ndarray, what: str) -> np.ndarray:
    """(1 | prompts | images, ...) -> (images, ...)."""
    n = len(prompt_index)
    if len(x) == n:
        return x
    if len(x) == 1:
        return np.repeat(x, n, axis=0)
    if len(x) == n_prompts:
        return x[prompt_index]
    raise ValueError(f"{what}: got {len(x)} entries for {n_prompts} prompts and {n} images; give one, one per "
                     "prompt or one per image")


def numpy_to_pil(images: np.ndarray):
    from PIL import Image

    return [Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)) for im in images]


def as_arrays(x, n_prompts, what):
    """PIL image(s) or float array(s) in [0, 1] -> list of (H, W, C) float32 arrays, one per prompt."""
    from PIL import Image

    if isinstance(x, Image.Image):
        x = [x]
    elif isinstance(x, (np.ndarray, jax.Array)):
        x = np.asarray(x)
        batched = x.ndim == 4 or (what == "mask_image" and x.ndim == 3 and x.shape[-1] != 1)
        x = list(x) if batched else [x]
    else:
        x = list(x)
    if len(x) == 1 and n_prompts > 1:
        x = x * n_prompts
    if len(x) != n_prompts:
        raise ValueError(f"{what}: got {len(x)} images for {n_prompts} prompts; give one, or one per prompt")
    return x


def load_images(image, n_prompts, height, width, f, what):
    """-> (n_prompts, H, W, 3) float32 in [-1, 1]; H, W default to the image size rounded down to a multiple of f."""
    from PIL import Image

    out = []
    for im in as_arrays(image, n_prompts, what):
        if isinstance(im, Image.Image):
            im = im.convert("RGB")
            h = height or im.height // f * f
            w = width or im.width // f * f
            if (im.height, im.width) != (h, w):
                im = im.resize((w, h), resample=Image.LANCZOS)
            arr = np.asarray(im, np.float32) / 255.0
        else:
            arr = np.asarray(im, np.float32)
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise ValueError(f"{what}: arrays must be (H, W, 3) or (B, H, W, 3) floats in [0, 1], got {arr.shape}")
            h = height or arr.shape[0] // f * f
            w = width or arr.shape[1] // f * f
            if arr.shape[:2] != (h, w):
                arr = np.asarray(Image.fromarray((arr * 255).round().clip(0, 255).astype(np.uint8))
                                 .resize((w, h), resample=Image.LANCZOS), np.float32) / 255.0
        out.append(arr * 2.0 - 1.0)
    if len({a.shape for a in out}) != 1:
        raise ValueError(f"{what}: all images must have the same size")
    return np.stack(out)


def load_masks(mask, n_prompts, height, width):
    """-> (n_prompts, H, W, 1) float32 of 0/1 (1 = repaint), binarised at 0.5 as diffusers."""
    from PIL import Image

    out = []
    for m in as_arrays(mask, n_prompts, "mask_image"):
        if isinstance(m, Image.Image):
            m = m.convert("L")
            if (m.height, m.width) != (height, width):
                m = m.resize((width, height), resample=Image.LANCZOS)
            arr = np.asarray(m, np.float32) / 255.0
        else:
            arr = np.asarray(m, np.float32)
            arr = arr[..., 0] if arr.ndim == 3 else arr
            if arr.shape != (height, width):
                raise ValueError(f"mask_image must be {height}x{width} like the image, got {arr.shape}")
        out.append((arr >= 0.5).astype(np.float32)[..., None])
    return np.stack(out)


def load_low_res(image, n_prompts: int, f: int) -> np.ndarray:
    """-> (n_prompts, h, w, 3) float32 in [-1, 1], h and w multiples of the VAE factor (diffusers'
    VaeImageProcessor(resample="bicubic") on PIL images; arrays must have such sizes already)."""
    from PIL import Image

    out, size = [], None
    for im in as_arrays(image, n_prompts, "image"):
        if isinstance(im, Image.Image):
            if size is None:
                size = (im.width // f * f, im.height // f * f)
            if 0 in size:
                raise ValueError(f"image {im.width}x{im.height} is smaller than the VAE factor {f}")
            if im.size != size:
                im = im.resize(size, resample=Image.BICUBIC)
            arr = np.asarray(im.convert("RGB"), np.float32) / 255.0
        else:
            arr = np.asarray(im, np.float32)
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise ValueError(f"image arrays must be (h, w, 3) or (B, h, w, 3) floats in [0, 1], got "
                                 f"{arr.shape}")
            if arr.shape[0] % f or arr.shape[1] % f or 0 in arr.shape:
                raise ValueError(f"image array {arr.shape[0]}x{arr.shape[1]}: height and width must be positive "
                                 f"multiples of {f} (the VAE factor); resize it, or pass a PIL image")
        out.append(arr * 2.0 - 1.0)
    if len({a.shape for a in out}) != 1:
        raise ValueError("image: all images must have the same size")
    return np.stack(out)
