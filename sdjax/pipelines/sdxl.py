"""SDXL base and refiner: two text encoders (the refiner: the second alone), pooled text embeddings and
micro-conditioning as the UNet's added conditioning; the base -> refiner hand-off (ensemble of expert denoisers).
Everything else is the one program (`sdjax.pipelines.program`)."""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sdjax import distributed, prompts as prompts_lib, samplers as samplers_lib
from sdjax.pipelines import folder as folder_lib
from sdjax.pipelines.base import PipelineOutput, PromptInputs, check_fraction, per_prompt
from sdjax.pipelines.images import to_list
from sdjax.pipelines.program import Conditioning
from sdjax.original_layout import ComponentConfigs
from sdjax.pipelines.sd import StableDiffusionPipeline, check_clip_skip, encode_chunks, scheduler_with_class


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """SDXL base (two text encoders) or refiner (`text_encoder_2` only, aesthetic-score conditioning), with the same
    modes, samplers, seeding and single sharded program as `StableDiffusionPipeline`.

    Conditioning as diffusers' StableDiffusionXL(Img2Img)Pipeline: context = concat(penultimate hidden states of
    text_encoder, text_encoder_2) (refiner: text_encoder_2's alone), pooled = text_encoder_2's `text_embeds`,
    time_ids = original size + crop top-left + target size (refiner: + aesthetic score instead of target size).
    """

    def __init__(self, *, tokenizer, text_encoder, tokenizer_2, text_encoder_2, vae, unet, scheduler_config: dict,
                 force_zeros_for_empty_prompt: bool = True, requires_aesthetics_score: bool = False, name: str = "",
                 mesh: Mesh | None = None):
        if text_encoder_2 is None or tokenizer_2 is None:
            raise ValueError("SDXL needs tokenizer_2 and text_encoder_2 (the pooled text embedding comes from it)")
        if (tokenizer is None) != (text_encoder is None):
            raise ValueError("give tokenizer and text_encoder together (base), or neither (refiner)")
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_aesthetics_score = bool(requires_aesthetics_score)
        n_ids = 5 if self.requires_aesthetics_score else 6
        config = unet.config
        got = (config.addition_time_embed_dim or 0) * n_ids + text_encoder_2.config.projection_dim
        if config.addition_embed_type != "text_time" or got != config.projection_class_embeddings_input_dim:
            raise ValueError(
                f"the UNet does not take SDXL conditioning: addition_embed_type {config.addition_embed_type!r}, "
                f"projection_class_embeddings_input_dim {config.projection_class_embeddings_input_dim} but {n_ids} "
                f"time ids x {config.addition_time_embed_dim} + pooled {text_encoder_2.config.projection_dim} = "
                f"{got} (requires_aesthetics_score={self.requires_aesthetics_score})"
            )
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                         scheduler_config=scheduler_config, name=name, mesh=mesh)

    @classmethod
    def accepts(cls, index: dict) -> bool:
        return folder_lib.has_component(index, "text_encoder_2")

    @classmethod
    def from_parts(cls, source, *, dtype, param_dtype, vae_dtype, mesh):
        """An SDXL base or refiner (parts: tokenizer(_2), text_encoder(_2), vae, unet, scheduler;
        `force_zeros_for_empty_prompt` and `requires_aesthetics_score` from model_index.json)."""
        from sdjax.models import CLIPTextModel
        from sdjax.models.clip import CLIPTextModelWithProjection

        source.require(("tokenizer_2", "text_encoder_2", "vae", "unet", "scheduler"))
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        base = source.has("text_encoder")
        if base:
            source.require(("tokenizer",))
        return cls(
            tokenizer=source.tokenizer("tokenizer") if base else None,
            text_encoder=source.model(CLIPTextModel, "text_encoder", **kw) if base else None,
            tokenizer_2=source.tokenizer("tokenizer_2"),
            text_encoder_2=source.model(CLIPTextModelWithProjection, "text_encoder_2", **kw),
            force_zeros_for_empty_prompt=source.flag("force_zeros_for_empty_prompt", True),
            requires_aesthetics_score=source.flag("requires_aesthetics_score", False),
            **folder_lib.load_vae_unet(source, dtype, param_dtype, vae_dtype),
            mesh=mesh,
        )

    # -- conditioning ------------------------------------------------------------------------------------------

    def encoder_names(self) -> tuple[str, ...]:
        return ("text_encoder", "text_encoder_2") if self.text_encoder is not None else ("text_encoder_2",)

    def text_encoders(self) -> dict:
        return {name: getattr(self, name) for name in self.encoder_names()}

    def component_configs(self) -> ComponentConfigs:
        base = self.text_encoder is not None
        return ComponentConfigs(
            pipeline_class="StableDiffusionXLPipeline" if base else "StableDiffusionXLImg2ImgPipeline",
            unet=self.unet.config.to_dict(), vae=self.vae.config.to_dict(),
            text_encoder=self.text_encoder.config.to_dict() if base else None,
            text_encoder_2=self.text_encoder_2.config.to_dict(), scheduler=scheduler_with_class(self.scheduler_config),
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            requires_aesthetics_score=self.requires_aesthetics_score)

    def prompt_inputs(self, prompts, negative_prompt, *, cfg, mode, height, width, prompt_2=None,
                     negative_prompt_2=None, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                     negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None,
                     aesthetic_score=6.0, negative_aesthetic_score=2.5, prompt_syntax="plain", emphasis="original",
                     clip_skip=None, negative_clip_skip=None):
        n = len(prompts)
        prompts_2 = prompts if prompt_2 is None else per_prompt(prompt_2, n, "prompt_2")
        # diffusers zeroes the negative embeddings when no negative_prompt is given (negative_prompt_2 alone
        # does not count) and the model asks for it
        zero = negative_prompt is None and self.force_zeros_for_empty_prompt
        negatives = per_prompt("" if negative_prompt is None else negative_prompt, n, "negative_prompt")
        negatives_2 = negatives if negative_prompt_2 is None else per_prompt(negative_prompt_2, n,
                                                                               "negative_prompt_2")
        tokenizers = {"text_encoder": self.tokenizer, "text_encoder_2": self.tokenizer_2}
        # as diffusers: the refiner's single encoder reads `prompt` (and `negative_prompt`), not the *_2 ones
        texts = list(zip(self.encoder_names(), (prompts, prompts_2), (negatives, negatives_2)))
        groups = {"": [(tokenizers[name], pos) for name, pos, _ in texts]}
        if cfg and not zero:
            groups["neg_"] = [(tokenizers[name], neg) for name, _, neg in texts]
        inputs, text_static = prompts_lib.text_inputs(groups, prompt_syntax, emphasis)

        def size(value, name):
            value = (height, width) if value is None else tuple(int(v) for v in value)
            if len(value) != 2:
                raise ValueError(f"{name} must be (height, width) or (top, left), got {value}")
            return value

        orig = size(original_size, "original_size")
        crop = size(crops_coords_top_left, "crops_coords_top_left")
        target = size(target_size, "target_size")
        neg_crop = size(negative_crops_coords_top_left, "negative_crops_coords_top_left")
        if self.requires_aesthetics_score:
            neg_orig = orig if negative_original_size is None else size(negative_original_size, "")
            time_ids = (*orig, *crop, float(aesthetic_score))
            neg_time_ids = (*neg_orig, *neg_crop, float(negative_aesthetic_score))
        elif mode == "txt2img":  # StableDiffusionXLPipeline: the negative sizes count only when both are given
            time_ids = (*orig, *crop, *target)
            neg_time_ids = time_ids
            if negative_original_size is not None and negative_target_size is not None:
                neg_time_ids = (*size(negative_original_size, "negative_original_size"), *neg_crop,
                                *size(negative_target_size, "negative_target_size"))
        else:  # StableDiffusionXLImg2ImgPipeline (it pairs the negative sizes with the positive crop)
            neg_orig = orig if negative_original_size is None else size(negative_original_size, "")
            neg_target = target if negative_target_size is None else size(negative_target_size, "")
            time_ids = (*orig, *crop, *target)
            neg_time_ids = (*neg_orig, *crop, *neg_target)
        inputs["time_ids"] = np.tile(np.asarray(time_ids, np.float32), (n, 1))
        if cfg:
            inputs["neg_time_ids"] = np.tile(np.asarray(neg_time_ids, np.float32), (n, 1))
        skips = (("clip_skip", check_clip_skip(clip_skip, self.clip_skip_limit())),
                 ("neg_clip_skip", check_clip_skip(negative_clip_skip, self.clip_skip_limit())))
        static = (("zero_negatives", bool(cfg and zero)), ("encoders", len(texts)), *text_static, *skips)
        return PromptInputs(per_prompt=inputs, static=static)

    def clip_skip_limit(self) -> int:
        """SDXL reads the penultimate layer already: clip_skip goes back from there."""
        return super().clip_skip_limit() - 1

    def conditioning(self, static: tuple):
        options = dict(static)
        names = self.encoder_names()

        def embed(encoders, inputs, prefix):
            # each encoder chunk by chunk, its own emphasis (as A1111); pooled from text_encoder_2's first chunk
            states, pooled = [], None
            for j, name in enumerate(names):
                def run(ids, encoder=encoders[name]):  # the penultimate layer, or clip_skip layers before it
                    out = encoder(ids, output_hidden_states=True)
                    return out.hidden_states[-((options.get(f"{prefix}clip_skip") or 0) + 2)], out.text_embeds

                s, p = encode_chunks(run, inputs[f"{prefix}ids_{j}"], inputs.get(f"{prefix}weights_{j}"),
                                     options["emphasis"])
                states.append(s)
                if p is not None:
                    pooled = p
            return jnp.concatenate(states, axis=-1), pooled

        def encode(encoders, inputs, cfg):
            context, pooled = embed(encoders, inputs, "")
            mask = inputs.get("mask")
            cond = Conditioning(context=context, added={"text_embeds": pooled, "time_ids": inputs["time_ids"]},
                                context_mask=mask)
            if not cfg:
                return cond, None
            if options["zero_negatives"]:  # zero keys and values: the padding chunks do not matter
                neg_context, neg_pooled, neg_mask = jnp.zeros_like(context), jnp.zeros_like(pooled), mask
            else:
                neg_context, neg_pooled = embed(encoders, inputs, "neg_")
                neg_mask = inputs.get("neg_mask")
            return cond, Conditioning(context=neg_context,
                                      added={"text_embeds": neg_pooled, "time_ids": inputs["neg_time_ids"]},
                                      context_mask=neg_mask)

        return encode

    # -- call --------------------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        sampler: str = "euler",
        seed: int | Sequence[int] = 0,
        num_images_per_prompt: int = 1,
        latents=None,
        image=None,
        mask_image=None,
        strength: float = 0.3,
        output_type: str = "pil",
        guidance_rescale: float = 0.0,
        *,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        refiner: "StableDiffusionXLPipeline | None" = None,
        high_noise_frac: float | None = None,
        refiner_num_inference_steps: int | None = None,
        prompt_syntax: str = "plain",
        emphasis: str = "original",
        clip_skip: int | None = None,
        negative_clip_skip: int | None = None,
    ) -> PipelineOutput:
        """Generate images; the arguments of `StableDiffusionPipeline.__call__` plus SDXL's.

        prompt_2 / negative_prompt_2: the texts for text_encoder_2 (default: prompt / negative_prompt); a refiner
        (one encoder) reads prompt and negative_prompt only, as diffusers. With `force_zeros_for_empty_prompt` (SDXL
        base) and no negative_prompt, the negative embeddings are zeros.
        original_size, crops_coords_top_left, target_size (and negative_*): micro-conditioning as (height, width) /
        (top, left); sizes default to the output size. aesthetic_score / negative_aesthetic_score: the refiner's
        (requires_aesthetics_score) conditioning instead of target_size.
        denoising_end: stop after this fraction of the schedule (with output_type="latent", hand the latents to
        a refiner); denoising_start: continue from `image` (latents, or an image to encode) at this fraction,
        without adding noise (strength is then ignored). The cut-offs follow diffusers' timestep arithmetic.
        refiner, high_noise_frac: ensemble of expert denoisers in one call: this pipeline runs the first
        high_noise_frac of the schedule (denoising_end), `refiner` the rest (denoising_start) from its latents,
        with the same prompts, negatives, sampler, steps, guidance, seed and micro-conditioning.
        refiner_num_inference_steps: the length of the refiner's own schedule (default num_inference_steps), of
        which it runs the part after high_noise_frac, as diffusers' refiner called with that num_inference_steps
        and denoising_start=high_noise_frac (40 steps at 0.8: about the last 8).
        prompt_syntax, emphasis: as `StableDiffusionPipeline.__call__` (both encoders chunked alike, the pooled
        embedding from the first chunk); the refiner reads the prompts with the same syntax. clip_skip: diffusers'
        (the layer `clip_skip` before the penultimate one, for both encoders; the pooled embedding unchanged; the
        negative prompts with negative_clip_skip).
        """
        options = dict(
            prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, original_size=original_size,
            crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size,
            aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
            prompt_syntax=prompt_syntax, emphasis=emphasis, clip_skip=clip_skip,
            negative_clip_skip=negative_clip_skip,
        )
        common = dict(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed,
            num_images_per_prompt=num_images_per_prompt, guidance_rescale=guidance_rescale,
        )
        if refiner is None:
            if high_noise_frac is not None or refiner_num_inference_steps is not None:
                what = "high_noise_frac" if high_noise_frac is not None else "refiner_num_inference_steps"
                raise ValueError(f"{what} needs refiner= (the pipeline that denoises the rest)")
            return self.generate_images(
                prompt, negative_prompt, height=height, width=width, latents=latents, image=image,
                mask_image=mask_image, strength=strength, output_type=output_type, denoising_start=denoising_start,
                denoising_end=denoising_end, text_options=options, **common)
        if not isinstance(refiner, StableDiffusionXLPipeline):
            raise ValueError(f"refiner must be a StableDiffusionXLPipeline, got {type(refiner).__name__}")
        if denoising_end is not None:
            raise ValueError("give high_noise_frac with refiner=, not denoising_end")
        frac = check_fraction(high_noise_frac, "high_noise_frac")
        if frac is None:
            raise ValueError("refiner= needs high_noise_frac (the fraction of the schedule the base denoises)")
        if refiner.vae_scale_factor != self.vae_scale_factor or refiner.latent_channels != self.latent_channels:
            raise ValueError("the refiner's VAE latents differ from this pipeline's; they cannot be handed over")
        refiner_common = dict(common)
        if refiner_num_inference_steps is not None:
            refiner_common["num_inference_steps"] = refiner_num_inference_steps
        # before the base runs: the refiner's part of its schedule must hold at least one step
        self._refiner_calls(refiner, frac, sampler, num_inference_steps, refiner_num_inference_steps)
        handed = self.generate_images(
            prompt, negative_prompt, height=height, width=width, latents=latents, image=image, mask_image=mask_image,
            strength=strength, output_type="latent", denoising_start=denoising_start, denoising_end=frac,
            text_options=options, **common)
        # with several processes each holds its own rows; the refiner's batch needs them all
        handed = distributed.gather_rows(handed.images, handed.indices,
                                         len(to_list(prompt)) * int(num_images_per_prompt))
        return refiner.generate_images(
            prompt, negative_prompt, height=None, width=None, latents=None, image=handed, mask_image=None,
            strength=strength, output_type=output_type, denoising_start=frac, text_options=options,
            **refiner_common)

    def handoff_steps(self, refiner: "StableDiffusionXLPipeline", high_noise_frac: float, *, sampler: str = "euler",
                      num_inference_steps: int = 50, refiner_num_inference_steps: int | None = None):
        """The sampler calls each side runs in a txt2img `self(..., refiner=refiner, high_noise_frac=...)`:
        (range of the base's calls out of num_inference_steps' schedule, range of the refiner's calls out of its own
        schedule). Raises ValueError (one line) if either side would have no step."""
        frac = check_fraction(high_noise_frac, "high_noise_frac")
        if frac is None:
            raise ValueError("high_noise_frac is required")
        made = samplers_lib.make_sampler(sampler, self.scheduler_config, num_inference_steps)
        try:
            _, end = self.schedule_range(made, "txt2img", 1.0, None, frac, num_inference_steps)
        except ValueError:
            raise ValueError(f"high_noise_frac {frac} leaves the base no step of its {num_inference_steps}: raise "
                             "high_noise_frac or num_inference_steps") from None
        return range(0, end), self._refiner_calls(refiner, frac, sampler, num_inference_steps,
                                                  refiner_num_inference_steps)

    @staticmethod
    def _refiner_calls(refiner, frac, sampler, num_inference_steps, refiner_num_inference_steps) -> range:
        steps = num_inference_steps if refiner_num_inference_steps is None else refiner_num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            name = "num_inference_steps" if refiner_num_inference_steps is None else "refiner_num_inference_steps"
            raise ValueError(f"{name} must be an int of at least 1, got {steps!r}")
        try:
            made = samplers_lib.make_sampler(sampler, refiner.scheduler_config, int(steps))
        except ValueError as e:
            raise ValueError(f"the refiner's steps: {e}") from None
        try:
            start, end = refiner.schedule_range(made, "img2img", 1.0, frac, None, int(steps))
        except ValueError:
            raise ValueError(f"the refiner's {steps}-step schedule has no step after high_noise_frac {frac}: lower "
                             "high_noise_frac or raise refiner_num_inference_steps") from None
        return range(start, end)
