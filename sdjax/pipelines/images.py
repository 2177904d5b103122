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


def open_image(path, what: str):
    """A PIL image from a file path; ValueError naming the file if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (FileNotFoundError, IsADirectoryError):
        raise ValueError(f"{what}: {path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{what}: {path}: not an image PIL can read ({e})") from None


def normalise(image, what: str):
    """One image as the pipelines take it: a path is opened; a PIL image is turned upright by its EXIF orientation
    and converted to 8-bit RGB with high-bit-depth greyscale (16-bit, 32-bit int, float modes) scaled to its range
    instead of clipped to white; an integer array is scaled to [0, 1] (uint8 by 255, uint16 by 65535; other
    integer types refused; an integer mask: non-zero = repaint); a float array is returned as it is."""
    import os

    from PIL import Image, ImageOps

    if isinstance(image, (str, os.PathLike)):
        image = open_image(image, what)
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.asarray(image, np.float64)
            scale = 255.0 if image.mode == "F" else 65535.0
            image = Image.fromarray((np.clip(arr / scale, 0, 1) * 255).round().astype(np.uint8), "L")
        return image.convert("RGB") if image.mode != "RGB" else image
    arr = np.asarray(image)
    if what == "mask_image" and (arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer)):
        return (arr > 0).astype(np.float32)  # as diffusers binarises an integer mask: any non-zero value repaints
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what}: arrays must be floats in [0, 1] (or uint8 / uint16), got {arr.dtype}")
    return arr


def as_arrays(x, n_prompts, what):
    """Image(s) -> list of `normalise`d images (8-bit RGB PIL images or float arrays in [0, 1]), one per prompt.
    x: a PIL image, a file path, an (H, W, C) or (B, H, W, C) array, or a list of them."""
    import os

    from PIL import Image

    if isinstance(x, (Image.Image, str, os.PathLike)):
        x = [x]
    elif isinstance(x, (np.ndarray, jax.Array)):
        x = np.asarray(x)
        batched = x.ndim == 4 or (what == "mask_image" and x.ndim == 3 and x.shape[-1] != 1)
        x = list(x) if batched else [x]
    else:
        try:
            x = list(x)
        except TypeError:
            raise ValueError(f"{what}: expected a PIL image, a file path, an array or a list of them, got "
                             f"{type(x).__name__}") from None
    if len(x) == 1 and n_prompts > 1:
        x = x * n_prompts
    if len(x) != n_prompts:
        raise ValueError(f"{what}: got {len(x)} images for {n_prompts} prompts; give one, or one per prompt")
    return [normalise(im, what) for im in x]


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
