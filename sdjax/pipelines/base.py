"""What every pipeline family shares on the host: checking a call, preparing its batch, and running the one compiled
program (`sdjax.pipelines.program`) with the family's conditioning.

A family (`sd`, `sdxl`, `upscale`) subclasses `DiffusionPipeline` and provides three hooks:
- `text_encoders()`: name -> text encoder module (the weights its conditioning uses);
- `prompt_inputs(prompts, negative_prompt, cfg=, mode=, height=, width=, **options)`: a `PromptInputs` of host
  arrays (its own names, read only by its own encoder);
- `conditioning(static)`: the program-side `Encode` function that turns those arrays into `Conditioning`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdjax import samplers as samplers_lib
from sdjax.distributed import data_mesh
from sdjax.lora import formats as lora_formats
from sdjax.lora.merge import Adapters
from sdjax.lora.targets import Targets, unet_layout
from sdjax.models.layers import Attention
from sdjax.pipelines import images as images_lib
from sdjax.pipelines.noise import image_keys
from sdjax.pipelines.program import (
    Batch, Encode, Networks, Plan, Schedule, choose_layout, compile_program, fetch_batch, put_batch,
)
from sdjax.pipelines.textual_inversion import TextualInversionMixin

OUTPUT_TYPES = ("pil", "np", "latent")
# Size limits, checked before anything is compiled (a size beyond what a device can hold would otherwise compile
# for minutes, then fail or take the process down with it):
MAX_SIDE = 16384  # pixels, either side of an image
# images per device x height x width, with neither memory saver on; x2 with attention chunking, x2 more with VAE
# tiling (the two parts whose memory grows fastest with the size: self-attention over the latent pixels, the
# full-size decode). 4 megapixels: e.g. 4 SDXL images of 1024x1024, or one 2048x2048, on each device.
MAX_PIXELS_PER_DEVICE = 2048 * 2048


class ImageTooLargeError(ValueError):
    """A call asks for more pixels than `DiffusionPipeline.max_pixels()` allows on one device."""

    def __init__(self, message: str, *, pixels: int, limit: int):
        super().__init__(message)
        self.pixels, self.limit = pixels, limit


@dataclasses.dataclass
class PipelineOutput:
    """images: this process's images; indices: their positions in the whole batch (all of range(batch) in a
    single-process run; with several processes each holds the images of its own devices, see sdjax.distributed)."""

    images: Any
    indices: Any = None


@dataclasses.dataclass(frozen=True)
class CompiledCall:
    """The program a pipeline call would run, lowered and compiled but not run (`DiffusionPipeline.compile_call`).

    `compiled.memory_analysis()` is the call's device memory per device (arguments: weights and inputs; outputs;
    temporaries: every intermediate buffer, the sampling loop included); `compiled.cost_analysis()` its FLOPs per
    device (XLA counts a loop's body once: text encoding, one sampler call and decoding)."""

    plan: Plan
    lowered: Any  # jax.stages.Lowered
    compiled: Any  # jax.stages.Compiled
    lower_seconds: float
    compile_seconds: float


class _CompiledOnly(Exception):
    """Carries a CompiledCall out of a pipeline call made by `compile_call` (nothing is run)."""

    def __init__(self, call: CompiledCall):
        super().__init__("compiled, not run")
        self.call = call


@dataclasses.dataclass
class PromptInputs:
    """A family's host-side inputs for one call (see the module docstring)."""

    per_prompt: dict  # name -> (n_prompts, ...) array; the program gets one row per image
    per_image: dict = dataclasses.field(default_factory=dict)  # name -> (n_images, ...) array, as it is
    static: tuple = ()  # options that fix the program (part of its cache key)
    keys: np.ndarray | None = None  # (n_images, 2) key data replacing the seed's (the upscaler's tiles)


# -- checks of call arguments ----------------------------------------------------------------------------------------


def check_number(value, name: str, *, low=None, high=None, integer=False, low_open=False, high_open=False):
    """`value` as a float (int if integer) after checking it is a finite number in range; ValueError (one line)
    naming `name` otherwise. NaN and infinities are refused: NaN guidance would silently turn guidance off."""
    kind = "an integer" if integer else "a finite number"
    ok_types = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    v = int(value) if integer else float(value)
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return v


def check_fraction(value, name):
    """None, or a float strictly between 0 and 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (float, int, np.floating)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a float strictly between 0 and 1 (a fraction of the schedule), got {value!r}")
    return float(value)


def per_prompt(value, n_prompts: int, name: str) -> list[str]:
    """One string, or one per prompt -> a list of n_prompts strings."""
    values = images_lib.to_list(value)
    if len(values) == 1 and n_prompts > 1:
        values = values * n_prompts
    if len(values) != n_prompts or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name} has {len(values)} entries but prompt has {n_prompts}: give one string, or one per "
                         "prompt")
    return values


def check_prompts(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    return list(prompts)


def check_seed(seed, n_prompts: int):
    """An int seed, or one int per prompt; each in [0, 2**32) (the key's range: larger ones would wrap)."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return check_number(seed, "seed", low=0, high=2**32 - 1, integer=True)
    if isinstance(seed, (str, bytes)) or not hasattr(seed, "__iter__"):
        raise ValueError(f"seed must be an int or one int per prompt, got {seed!r}")
    seeds = [check_number(s, "seed", low=0, high=2**32 - 1, integer=True) for s in seed]
    if len(seeds) != n_prompts:
        raise ValueError(f"seed has {len(seeds)} entries but there are {n_prompts} prompts: give one int, or one per "
                         "prompt")
    return seeds


def timestep_cutoff(fraction: float, num_train_timesteps: int) -> int:
    # diffusers' arithmetic exactly (Python round: half to even)
    return int(round(num_train_timesteps - (fraction * num_train_timesteps)))


class DiffusionPipeline(TextualInversionMixin):
    """The shared machinery of the pipeline families (not used on its own); textual-inversion embeddings come from
    `TextualInversionMixin`."""

    def __init__(self, *, vae, unet, scheduler_config: dict, name: str = "", mesh: Mesh | None = None):
        self.vae = vae
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        self.name = name
        self.mesh = mesh or data_mesh()
        self.vae_tiling = False
        self.vae_tile_size = None
        self.attention_chunk: int | None = None
        self.max_pixels_per_device: int | None = MAX_PIXELS_PER_DEVICE  # None: no limit (you know your devices)
        self._replicated = NamedSharding(self.mesh, P())
        self._programs: dict[Plan, Any] = {}
        self._adapters: Adapters | None = None  # made by the first load_lora_weights
        self._compile_only = False  # set by compile_call
        # shape-only modules (`PretrainedModel.abstract`) get the sharding only: such a pipeline can be lowered and
        # compiled, not run (bench/sdxl_memory.py reads the compiled program's memory without any weights)
        place = (lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated)
                 if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x, self._replicated))
        for module in (*self.text_encoders().values(), vae, unet):
            nnx.update(module, jax.tree.map(place, nnx.state(module)))

    # -- the family's hooks ----------------------------------------------------------------------------------------

    def text_encoders(self) -> dict:
        """name -> text encoder module (the weights the program's conditioning uses)."""
        raise NotImplementedError

    def prompt_inputs(self, prompts, negative_prompt, *, cfg, mode, height, width, **options) -> PromptInputs:
        raise NotImplementedError

    def conditioning(self, static: tuple) -> Encode:
        raise NotImplementedError

    # -- properties and options ------------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def enable_attention_chunking(self, query_chunk: int | None = 1024) -> None:
        """Compute attention in chunks of `query_chunk` queries (same numbers, less memory); None turns it off."""
        self.attention_chunk = query_chunk
        for module in (self.unet, self.vae):
            for _, m in nnx.iter_modules(module):
                if isinstance(m, Attention):
                    m.query_chunk_size = query_chunk
        self._programs.clear()

    def enable_vae_tiling(self, on: bool = True, tile_size: int | None = None) -> None:
        """Decode images larger than one tile tile by tile (diffusers' tiled decode). tile_size: the tile side in
        pixels (default: the VAE config's sample_size, as diffusers; SDXL's is 1024, so a 1024² image is decoded in
        one piece unless a smaller tile, e.g. 512, is given)."""
        self.vae_tiling = on
        self.vae_tile_size = None if tile_size is None else int(tile_size)
        self._programs.clear()

    # -- LoRA / LyCORIS adapters (diffusers' names) -----------------------------------------------------------------

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          weight_name: str | None = None) -> None:
        """Load a LoRA / LyCORIS adapter into the UNet and text encoders and make it the active one (weight 1).

        The source: a file (`.safetensors`, or `.pt`/`.ckpt`/`.bin` read without running pickled code), a folder
        (`weight_name`, else `pytorch_lora_weights.safetensors`), or a dict {key: numpy array} in the file's layout.
        Formats (detected from the keys): kohya/LyCORIS `lora_unet_*`/`lora_te*_*` (LoRA, LoCon, LoHa, LoKr; SDXL
        names in the original `input_blocks` layout too) and diffusers/PEFT `unet.*`/`text_encoder*.*`. Several
        adapters can be loaded (names default to "default_0", "default_1", ...); `set_adapters` mixes them. The
        merged weights are computed on the devices; the compiled generation program is reused as it is.
        """
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, dict):
            adapter = lora_formats.parse(source, {}, source="adapter dict")
        else:
            adapter = lora_formats.read_adapter(source, weight_name)
        self.adapters().load(adapter, adapter_name)

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Activate the loaded adapters `adapter_names` (a name or a list) with `adapter_weights` (one number, or
        one per adapter; a number may be {"unet": w, "text_encoder": w, "text_encoder_2": w}; default 1)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (list, tuple)):
            weights = list(adapter_weights)
        else:
            weights = [adapter_weights] * len(names)
        self.adapters().set_active(names, weights)

    def get_active_adapters(self) -> list[str]:
        return self._adapters.active_names() if self._adapters else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        """{component: names of the loaded adapters that change it}."""
        return self._adapters.list_adapters() if self._adapters else {}

    def delete_adapters(self, adapter_names) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.adapters().delete(names)

    def disable_lora(self) -> None:
        """Base weights back (bit-exactly; fused adapters are part of the base), adapters kept: `enable_lora`
        merges them again."""
        if self._adapters:
            self._adapters.set_enabled(False)

    def enable_lora(self) -> None:
        if self._adapters:
            self._adapters.set_enabled(True)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the touched weights get their original arrays back (bit-exactly), except what
        `fuse_lora` fused, which stays (diffusers' fuse -> unload)."""
        if self._adapters:
            self._adapters.unload()

    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None) -> None:
        """Fuse adapters into the base weights of `components` (default: every network adapters can change):
        `adapter_names` (default: the active ones, with their `set_adapters` weights) times `lora_scale`. The
        images are those of the adapters merged with weight x lora_scale; `unload_lora_weights` afterwards keeps the
        fused weights and drops the adapters; `unfuse_lora` gives the weights before the fuse back. safe_fusing:
        refuse (changing nothing) if a fused weight is not finite."""
        self.adapters().fuse(adapter_names, components, lora_scale, safe_fusing)

    def unfuse_lora(self, components: list[str] | None = None) -> None:
        """Undo `fuse_lora` in `components` (default: all): their weights before the fuse, with the still-loaded
        adapters merged as they are active."""
        if self._adapters:
            self._adapters.unfuse(components)

    def adapters(self) -> Adapters:
        """The pipeline's adapter state (`sdjax.lora.merge.Adapters`), made on first use."""
        if self._adapters is None:
            networks = {"unet": self.unet, **self.text_encoders()}
            layers_per_block, sdxl = unet_layout(self.unet)
            self._adapters = Adapters(networks, Targets(networks, layers_per_block=layers_per_block, sdxl=sdxl))
        return self._adapters

    # -- saving -----------------------------------------------------------------------------------------------------

    def component_configs(self):
        """The family's `sdjax.original_layout.ComponentConfigs` of the parts as they are."""
        raise NotImplementedError

    def save_pretrained(self, save_directory, variant: str | None = None, dtype=None):
        """Write the pipeline as a new diffusers folder that diffusers and sdjax load: its networks' current weights
        (fused LoRAs included), tokenizers, scheduler configs and model_index.json. The folder must not exist (it
        is written next to it and renamed into place: never half-written, nothing overwritten). variant: weight
        files named `<stem>.<variant>.safetensors` (diffusers' variant); dtype: the saved weights' dtype (default:
        as they are). Loaded adapters must be fused and unloaded, or unloaded, first; textual-inversion embeddings
        unloaded (they stay files to load at run time). Returns the folder's path."""
        from sdjax.lora.targets import is_abstract
        from sdjax.pipelines.saving import save_pipeline

        if self._adapters is not None and self._adapters.loaded:
            raise ValueError(f"LoRA adapters are loaded ({', '.join(self._adapters.loaded)}): fuse_lora() then "
                             "unload_lora_weights() to save them merged into the weights, or unload_lora_weights() "
                             "to save the model without them")
        if self._ti_loaded():
            raise ValueError("textual-inversion embeddings are loaded: unload_textual_inversion() first (load the "
                             "embedding files again after loading the saved folder)")
        if any(is_abstract(m) for m in (self.unet, self.vae, *self.text_encoders().values())):
            raise ValueError("this pipeline has shapes only (no weights): nothing to save")
        vocab = self._ti_base_rows()  # tables grown by embeddings since unloaded: saved at their own size
        return save_pipeline(self, save_directory, self.component_configs(), vocab_sizes=vocab, variant=variant,
                             dtype=dtype)

    # -- size limits ------------------------------------------------------------------------------------------------

    def max_pixels(self) -> int | None:
        """The most pixels (images per device x height x width) one device may be asked for: `max_pixels_per_device`
        (default `MAX_PIXELS_PER_DEVICE`), doubled with attention chunking and again with VAE tiling; None: no
        limit."""
        if self.max_pixels_per_device is None:
            return None
        return self.max_pixels_per_device * (2 if self.attention_chunk else 1) * (2 if self.vae_tiling else 1)

    def check_size(self, height: int, width: int, n_images: int) -> None:
        """ImageTooLargeError (a ValueError) if `n_images` images of height x width are beyond `MAX_SIDE` or, spread
        over the devices, beyond `max_pixels()`: before anything is compiled."""
        if max(height, width) > MAX_SIDE:
            raise ImageTooLargeError(f"{height}x{width} images: larger than sdjax takes ({MAX_SIDE} pixels a side)",
                                     pixels=height * width, limit=MAX_SIDE * MAX_SIDE)
        limit = self.max_pixels()
        per_device = -(-n_images // self.mesh.devices.size)
        pixels = per_device * height * width
        if limit is not None and pixels > limit:
            raise ImageTooLargeError(
                f"{per_device} image(s) of {height}x{width} per device are {pixels / 1e6:.3g} megapixels, above the "
                f"limit of {limit / 1e6:.3g} (sdjax.pipelines.base.MAX_PIXELS_PER_DEVICE, x2 with "
                "enable_attention_chunking(), x2 with enable_vae_tiling(); pipe.max_pixels_per_device = None lifts "
                "it): make fewer or smaller images per call", pixels=pixels, limit=limit)

    # -- one call ----------------------------------------------------------------------------------------------------

    def generate_images(self, prompt, negative_prompt, *, height, width, num_inference_steps, guidance_scale,
                        sampler, seed, num_images_per_prompt, latents, image, mask_image, strength, output_type,
                        guidance_rescale=0.0, denoising_start=None, denoising_end=None, text_options=None
                        ) -> PipelineOutput:
        """The shared body of every family's __call__: check, prepare host inputs, run the compiled program."""
        prompts = check_prompts(prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        n_per = check_number(num_images_per_prompt, "num_images_per_prompt", low=1, integer=True)
        steps = check_number(num_inference_steps, "num_inference_steps", low=1, integer=True)
        guidance_scale = check_number(guidance_scale, "guidance_scale")
        guidance_rescale = check_number(guidance_rescale, "guidance_rescale", low=0.0)
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image: inpainting repaints the masked part of an image")
        denoising_start = check_fraction(denoising_start, "denoising_start")
        denoising_end = check_fraction(denoising_end, "denoising_end")
        if denoising_start is not None and image is None:
            raise ValueError("denoising_start needs image (the partly denoised latents to continue from)")
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise ValueError(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end})")
        mode = "txt2img" if image is None else ("img2img" if mask_image is None else "inpaint")
        if mode != "txt2img" and denoising_start is None:
            strength = check_number(strength, "strength", low=0.0, high=1.0, low_open=True)
        seed = check_seed(seed, len(prompts))
        for name, value in (("height", height), ("width", width)):
            if value is not None:
                check_number(value, name, low=1, high=MAX_SIDE, integer=True)

        n = len(prompts) * n_per
        f = self.vae_scale_factor
        prompt_index = np.repeat(np.arange(len(prompts)), n_per)
        images = masks = None
        image_is_latents = images_lib.is_latents(image, self.latent_channels)
        if image_is_latents:
            if mode != "img2img":
                raise ValueError("image given as latents works for img2img only (not with mask_image)")
            images = images_lib.per_image(np.asarray(image, np.float32), len(prompts), prompt_index, "image")
            if height is not None or width is not None:
                if (height, width) != (images.shape[1] * f, images.shape[2] * f):
                    raise ValueError(f"height x width {height}x{width} does not match the image latents "
                                     f"{images.shape[1]}x{images.shape[2]} (VAE factor {f})")
            height, width = images.shape[1] * f, images.shape[2] * f
        elif image is not None:
            images = images_lib.load_images(image, len(prompts), height, width, f, "image")[prompt_index]
            height, width = images.shape[1:3]
        height = int(height or self.default_size)
        width = int(width or self.default_size)
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f} (the VAE factor), "
                             f"got {height}x{width}")
        self.check_size(height, width, n)
        if mask_image is not None:
            masks = images_lib.load_masks(mask_image, len(prompts), height, width)[prompt_index]
        if images is not None and not np.isfinite(images).all():
            raise ValueError("image has NaN or infinite values")

        sampler_obj = samplers_lib.make_sampler(sampler, self.scheduler_config, steps)
        start, end = self.schedule_range(sampler_obj, mode, strength, denoising_start, denoising_end, steps)
        latent_shape = (height // f, width // f, self.latent_channels)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (n, *latent_shape):
                raise ValueError(f"latents must have shape {(n, *latent_shape)} (batch, H/{f}, W/{f}, C), "
                                 f"got {latents.shape}")
            if not np.isfinite(latents).all():
                raise ValueError("latents have NaN or infinite values")

        cfg = guidance_scale > 1.0
        layout = choose_layout(n, self.mesh.devices.size, cfg=cfg, latent_height=latent_shape[0])
        mesh = layout.mesh(self.mesh.devices.flat)
        batch, batched = layout.batch, NamedSharding(mesh, P("data"))
        text = self.prompt_inputs(prompts, negative_prompt, cfg=cfg, mode=mode, height=height, width=width,
                                  **(text_options or {}))
        keys = text.keys
        if keys is None:
            keys = image_keys(seed, prompt_index, np.tile(np.arange(n_per), len(prompts)))

        def pad(x):  # repeat the last image to fill every device; cut back after
            if x is None:
                return None
            x = np.asarray(x)
            x = np.concatenate([x, np.repeat(x[-1:], batch - n, axis=0)]) if batch > n else x
            return put_batch(x, batched)

        arrays = {k: pad(v[prompt_index]) for k, v in text.per_prompt.items()}
        arrays.update({k: pad(v) for k, v in text.per_image.items()})
        inputs = Batch(keys=pad(keys), text=arrays, latents=pad(latents), image=pad(images), mask=pad(masks))
        inpaint_unet = self.unet.config.in_channels == self.latent_channels * 2 + 1
        if mode == "inpaint" and not inpaint_unet and self.unet.config.in_channels != self.latent_channels:
            raise ValueError(f"the UNet takes {self.unet.config.in_channels} input channels: not an SD UNet")
        plan = Plan(
            mode=mode, sampler=sampler, calls=samplers_lib.calls_bucket(sampler_obj.num_calls), cfg=cfg, batch=batch,
            latent_hw=latent_shape[:2], given_latents=latents is not None, image_is_latents=image_is_latents,
            inpaint_unet=inpaint_unet, decode=output_type != "latent", vae_tiling=self.vae_tiling,
            text=text.static, vae_tile_size=self.vae_tile_size if self.vae_tiling else None, layout=layout,
        )
        # host values onto every device explicitly (no device op, so no compile, per new value or table length)
        replicate = lambda tree: jax.tree.map(lambda x: put_batch(np.asarray(x), NamedSharding(mesh, P())), tree)
        program = self.program(plan)
        args = (
            {k: nnx.state(m) for k, m in self.text_encoders().items()}, nnx.state(self.unet), nnx.state(self.vae),
            inputs, replicate(sampler_obj.padded(plan.calls)),
            replicate(Schedule.make(start, end, denoising_start is None, guidance_scale, guidance_rescale)),
        )
        if self._compile_only:
            t0 = time.perf_counter()
            lowered = program.lower(*args)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            raise _CompiledOnly(CompiledCall(plan, lowered, compiled, t1 - t0, time.perf_counter() - t1))
        out = program(*args)
        out, indices = fetch_batch(out, n)
        if not np.isfinite(out).all():
            raise FloatingPointError(
                "the pipeline produced NaN/inf values; the usual cause is a float16 VAE overflowing: load with "
                "vae_dtype=jnp.float32 (or dtype=jnp.bfloat16)"
            )
        if output_type in ("latent", "np"):
            return PipelineOutput(images=out, indices=indices)
        return PipelineOutput(images=images_lib.numpy_to_pil(out), indices=indices)

    def compile_call(self, *args, **kwargs) -> CompiledCall:
        """Lower and compile the program `self(*args, **kwargs)` would run, and stop before running it.

        The call checks and prepares its inputs as usual; a pipeline of shape-only networks on compile-only devices
        (a TPU topology's, on a CPU) gets their shapes, so this works without weights or the devices: see
        bench/tpu_aot.py. A tiled upscale gives its one tile program. The same call made afterwards runs this
        program without compiling it again.
        """
        self._compile_only = True
        try:
            self(*args, **kwargs)
        except _CompiledOnly as stop:
            return stop.call
        finally:
            self._compile_only = False
        raise RuntimeError("the call ran no pipeline program")

    def schedule_range(self, sampler, mode, strength, denoising_start, denoising_end, num_inference_steps):
        """(start, end) call indices, as diffusers' (SDXL) pipelines cut the schedule: strength or denoising_start
        pick the first call, denoising_end the last."""
        timesteps = np.asarray(sampler.timesteps)
        num_train = int(self.scheduler_config.get("num_train_timesteps", 1000))
        start = 0
        if denoising_start is not None:
            # diffusers' get_timesteps: keep the timesteps below the cut-off; a 2nd-order sampler must not start
            # between the two calls of one step
            count = int((timesteps < timestep_cutoff(denoising_start, num_train)).sum())
            if sampler.order == 2 and count % 2 == 0:
                count += 1
            start = sampler.num_calls - min(count, sampler.num_calls)
        elif mode != "txt2img":
            start = sampler.index_for_strength(float(strength))
        end = sampler.num_calls
        if denoising_end is not None:
            cutoff = timestep_cutoff(denoising_end, num_train)
            end = start + int((timesteps[start:] >= cutoff).sum())
        if start >= end:
            what = ("denoising_start" if denoising_start is not None else "strength") if end == sampler.num_calls \
                else "denoising_end"
            raise ValueError(f"{what} with {num_inference_steps} steps leaves no step to run; change it or raise "
                             "num_inference_steps")
        return start, end

    def program(self, plan: Plan):
        """The compiled program of `plan` (compiled on first use, then kept)."""
        if plan not in self._programs:
            networks = Networks(
                text={k: nnx.graphdef(m) for k, m in self.text_encoders().items()}, unet=nnx.graphdef(self.unet),
                vae=nnx.graphdef(self.vae), scaling_factor=float(self.vae.config.scaling_factor),
                latent_channels=self.latent_channels,
            )
            # every sharding of the program on the layout's mesh (the weights' replicated sharding is the same
            # placement on the pipeline's mesh: nothing is copied)
            mesh = plan.layout.mesh(self.mesh.devices.flat)
            self._programs[plan] = compile_program(plan, networks, self.conditioning(plan.text),
                                                   NamedSharding(mesh, P()), NamedSharding(mesh, P("data")))
        return self._programs[plan]
