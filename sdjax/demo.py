"""A Gradio web UI: prompt in, a gallery of candidates ordered by CLIP score out, with each image's PNG metadata.

    sdjax demo [--ckpt PATH] [--rerank-model PATH] [--refiner PATH] [--host 127.0.0.1] [--port 7860]

The work is `generate` (a plain function, usable and tested without Gradio); `build_demo` only lays out the
controls. One generation = one pipeline call of `n_candidates` images (image i keyed by fold_in(key(seed), i),
as everywhere in sdjax), with an optional refiner, then CLIP scoring. With an SDXL base and an SDXL refiner the
refiner is SDXL's ensemble of expert denoisers: the base denoises the first `high_noise_frac` of the schedule and
hands its latents to the refiner (`pipe(..., refiner=...)`); any other pair falls back to an img2img pass of the
refiner over the finished images. Every image is written as a PNG with the AUTOMATIC1111 `parameters` chunk, so a
downloaded file carries its settings. Gradio is imported only here (`pip install "sdjax[demo]"`); the server binds
to 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import tempfile
import uuid
from pathlib import Path

from sdjax.app import HIGH_NOISE_FRAC, default_clip  # noqa: F401 (default_clip: part of this module's API)

REFINER_STRENGTH = 0.3  # img2img fallback: the refiner re-noises the finished image this far and denoises it again
MAX_SEED = 2**31 - 1


@dataclasses.dataclass
class Candidate:
    """One generated image: its file (PNG with metadata), CLIP score (None without reranking) and settings."""

    path: str
    score: float | None
    batch_position: int
    parameters: str  # the A1111 `parameters` text stored in the PNG

    def caption(self, rank: int) -> str:
        score = "" if self.score is None else f"  CLIP {self.score:.2f}"
        return f"#{rank + 1}{score}  (pos {self.batch_position})"


def refiner_schedule(steps: int, strength: float = REFINER_STRENGTH) -> int:
    """Scheduler length whose last `strength` part is `steps` steps (img2img runs int(length * strength))."""
    n = math.ceil(steps / strength)
    while int(n * strength) < steps:
        n += 1
    return n


def is_sdxl_handoff(pipe, refiner) -> bool:
    """True when `pipe` is an SDXL base and `refiner` an SDXL pipeline whose latents it can hand over (SDXL's
    ensemble of expert denoisers); otherwise the demo runs the refiner as an img2img pass."""
    from sdjax.pipelines.sdxl import StableDiffusionXLPipeline

    return (isinstance(pipe, StableDiffusionXLPipeline) and isinstance(refiner, StableDiffusionXLPipeline)
            and pipe.text_encoder is not None
            and (pipe.vae_scale_factor, pipe.latent_channels) == (refiner.vae_scale_factor, refiner.latent_channels))


def generate(pipe, prompt: str, negative_prompt: str = "", *, guidance_scale: float = 7.5, width: int | None = None,
             height: int | None = None, steps: int = 25, sampler: str = "dpmpp_2m", seed: int = 0,
             n_candidates: int = 4, reranker=None, refiner=None, refiner_steps: int = 0,
             high_noise_frac: float = HIGH_NOISE_FRAC, outdir: str | os.PathLike | None = None,
             prompt_syntax: str = "a1111", loras=None, clip_skip: int = 1,
             embeddings: "EmbeddingFolders | None" = None) -> list[Candidate]:
    """Generate `n_candidates` images for `prompt`, best CLIP score first when a `reranker` is given (else in
    batch order), saved as PNGs with A1111 metadata in `outdir` (default: a new temporary folder).

    With a `refiner` and `refiner_steps` > 0: if `pipe` is an SDXL base and `refiner` an SDXL refiner
    (`is_sdxl_handoff`), the base denoises the first `high_noise_frac` of its `steps`-step schedule and the refiner
    continues in latent space over its own `refiner_steps`-step schedule, running the part after high_noise_frac
    (diffusers' ensemble of expert denoisers). Otherwise every finished image goes through an img2img pass of the
    refiner at strength REFINER_STRENGTH that runs `refiner_steps` denoising steps (high_noise_frac unused).
    An empty negative prompt is passed as None (SDXL base: zero negative embeddings, as diffusers).
    prompt_syntax: "a1111" (weights such as `(word:1.3)`, BREAK; `sdjax.prompts`) or "plain" (literal text).
    loras: an `sdjax.app.PromptLoras` of `pipe`: the prompt's `<lora:NAME:WEIGHT>` tags are taken out of its text
    and the LoRAs they name merged (without one, tags are text). clip_skip: A1111's Clip skip (1: the text
    encoder's last layer), prompt and negative prompt alike. embeddings: the `--embeddings-dir` folders: the
    embeddings the prompt or negative prompt name are loaded (once) before the call.
    """
    from PIL import PngImagePlugin

    from sdjax.app import UsageError
    from sdjax.bulk import clip_skip_options, image_metadata, lora_fields, syntax_fields
    from sdjax.prompts import plain_text

    prompt = prompt or ""
    if not prompt.strip():
        raise ValueError("the prompt is empty: describe the image to generate")
    n = int(n_candidates)
    if n < 1:
        raise ValueError(f"the number of candidates must be at least 1, got {n_candidates}")
    text, uses = prompt, ()
    if loras is not None:
        try:
            text, tags = loras.split(prompt)
        except UsageError as e:  # a bad tag or a LoRA file that is not there: the request's error
            raise ValueError(str(e)) from None
        uses = loras.activate(tags)
    if embeddings is not None:
        try:
            embeddings.load_for([text, negative_prompt or ""], pipe, refiner)
        except UsageError as e:  # a named embedding that cannot be loaded: the request's error
            raise ValueError(str(e)) from None
    clip_skip = int(clip_skip or 1)
    kw = dict(guidance_scale=float(guidance_scale), sampler=sampler, seed=int(seed), prompt_syntax=prompt_syntax,
              **clip_skip_options(clip_skip))
    refine = refiner is not None and int(refiner_steps or 0) > 0
    handoff = refine and is_sdxl_handoff(pipe, refiner)
    extra = {}
    if handoff:
        kw.update(refiner=refiner, high_noise_frac=float(high_noise_frac),
                  refiner_num_inference_steps=int(refiner_steps))
        extra = dict(refiner=refiner.name or "refiner", high_noise_frac=float(high_noise_frac),
                     refiner_steps=int(refiner_steps))
    images = pipe(text, negative_prompt or None, height=int(height) if height else None,
                  width=int(width) if width else None, num_inference_steps=int(steps), num_images_per_prompt=n,
                  output_type="pil", **kw).images
    if refine and not handoff:
        images = refiner([text] * n, negative_prompt or None, image=images, strength=REFINER_STRENGTH,
                         num_inference_steps=refiner_schedule(int(refiner_steps)), output_type="pil", **kw).images
        extra = dict(refiner=refiner.name or "refiner", refiner_mode="img2img", refiner_steps=int(refiner_steps),
                     refiner_strength=REFINER_STRENGTH)
    scores = [None] * n
    order = list(range(n))
    if reranker is not None:
        scores = [float(s) for s in reranker.score(images, plain_text(text, prompt_syntax))]
        order = sorted(order, key=lambda k: -scores[k])  # stable: ties keep batch order

    outdir = Path(outdir or tempfile.mkdtemp(prefix="sdjax-demo-"))
    outdir.mkdir(parents=True, exist_ok=True)
    out = []
    for k in order:
        im = images[k]
        params, _ = image_metadata(
            prompt=prompt, negative=negative_prompt or "", seed=int(seed), sampler=sampler, steps=int(steps),
            scale=float(guidance_scale), width=im.width, height=im.height, model=pipe.name, batch_position=k,
            **extra, **syntax_fields(prompt_syntax, "original", clip_skip), clip_score=scores[k],
            **lora_fields(uses))
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", params)
        path = outdir / f"{uuid.uuid4().hex[:12]}.png"
        im.save(path, format="PNG", pnginfo=info)
        out.append(Candidate(path=str(path), score=scores[k], batch_position=k, parameters=params))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Gradio


def _gradio():
    try:
        import gradio
    except ImportError:
        from sdjax.app import UsageError

        raise UsageError('the demo needs Gradio: pip install "sdjax[demo]"') from None
    return gradio


@dataclasses.dataclass
class EmbeddingFolders:
    """The demo's `--embeddings-dir` folders and the names loaded from them so far (a name is loaded once)."""

    dirs: tuple
    loaded: set = dataclasses.field(default_factory=set)

    def load_for(self, texts, pipe, refiner=None) -> None:
        from sdjax.app import load_named_embeddings

        for name, _ in load_named_embeddings(texts, self.dirs, pipe, refiner, skip=self.loaded):
            self.loaded.add(name)


def build_demo(pipe, reranker=None, refiner=None, loras=None, embeddings=None):
    """The UI for `pipe` (a `StableDiffusionPipeline`), with CLIP reranking if `reranker` (a `CLIPReranker`) is
    given and refiner controls if `refiner` (a second pipeline) is: the refiner's steps (0: off), and for an SDXL
    base with an SDXL refiner the high-noise fraction where the base hands over (`generate`). Returns a `gr.Blocks`;
    its `generate` endpoint (api_name "generate") takes the controls in the order they are listed below (hidden
    ones included) and returns the gallery, the best image's metadata and the seed used. loras: an
    `sdjax.app.PromptLoras` of `pipe`: prompts may name its LoRAs with `<lora:NAME:WEIGHT>` tags. embeddings: an
    `EmbeddingFolders`: prompts may name its embeddings."""
    gr = _gradio()
    from sdjax.samplers import SAMPLERS

    f = pipe.vae_scale_factor
    size = pipe.default_size
    outdir = Path(tempfile.mkdtemp(prefix="sdjax-demo-"))

    handoff = refiner is not None and is_sdxl_handoff(pipe, refiner)

    def run(prompt, negative, scale, width, height, steps, refiner_steps, high_noise_frac, seed, randomize, sampler,
            n_candidates, rerank, prompt_syntax="a1111", clip_skip=1):
        seed = random.randint(0, MAX_SEED) if randomize or seed is None else int(seed)
        try:
            candidates = generate(
                pipe, prompt, negative, guidance_scale=scale, width=width, height=height, steps=steps,
                sampler=sampler, seed=seed, n_candidates=n_candidates,
                reranker=reranker if rerank else None, refiner=refiner, refiner_steps=refiner_steps or 0,
                high_noise_frac=HIGH_NOISE_FRAC if high_noise_frac is None else high_noise_frac, outdir=outdir,
                prompt_syntax=prompt_syntax or "a1111", loras=loras, clip_skip=clip_skip or 1, embeddings=embeddings,
            )
        except ValueError as e:  # the pipeline's checks of the request: show them, not a traceback
            raise gr.Error(" ".join(str(e).split())) from None
        gallery = [(c.path, c.caption(r)) for r, c in enumerate(candidates)]
        return gallery, candidates[0].parameters, seed, [c.parameters for c in candidates]

    def show_parameters(parameters, evt):
        return parameters[evt.index] if parameters and evt.index is not None else ""

    show_parameters.__annotations__["evt"] = gr.SelectData  # Gradio fills arguments by type; gr is not global

    devices = pipe.mesh.devices.size
    header = (f"### sdjax: {pipe.name or 'Stable Diffusion'}\n{devices} device(s); default size {size}x{size}; "
              + ("candidates ordered by CLIP score." if reranker is not None else "no CLIP model loaded (no reranking)."))
    if refiner is not None:
        header += f"\n\nRefiner {refiner.name or ''}: " + (
            "SDXL hand-off in latent space (the base denoises the high-noise part, the refiner the rest)." if handoff
            else f"an img2img pass over the finished images (strength {REFINER_STRENGTH}; not SDXL's latent "
                 "hand-off).")
    if loras is not None:
        from sdjax.extra_networks import available

        names = available(loras.dirs)
        header += (f"\n\nLoRAs: `<lora:NAME:WEIGHT>` in the prompt ({len(names)} in "
                   f"{', '.join(map(str, loras.dirs))}: {', '.join(names[:20]) or 'none'}"
                   f"{', ...' if len(names) > 20 else ''}).")
    with gr.Blocks(title="sdjax demo", analytics_enabled=False) as demo:
        gr.Markdown(header)
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a photograph of an astronaut riding a horse")
                negative = gr.Textbox(label="Negative prompt", lines=1, placeholder="blurry, low quality")
                with gr.Row():
                    prompt_syntax = gr.Radio(["a1111", "plain"], value="a1111", label="Prompt syntax",
                                             info="a1111: (word:1.3), (word), [word], BREAK; plain: the text as it is")
                    clip_skip = gr.Slider(1, pipe.clip_skip_limit() + 1, value=1, step=1, label="Clip skip",
                                          info="A1111's: 1 reads the text encoder's last layer, 2 the one before")
                with gr.Row():
                    scale = gr.Slider(1.0, 20.0, value=7.5, step=0.5, label="Guidance scale")
                    steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                    # SDXL: the refiner's own schedule, of which it runs the part after the switch (diffusers'
                    # num_inference_steps of the refiner); img2img: the denoising steps of the pass
                    refiner_steps = gr.Slider(
                        0, 100 if handoff else 50, value=(25 if handoff else 10) if refiner is not None else 0,
                        step=1, visible=refiner is not None,
                        label="Refiner steps (its schedule; runs the part after the switch; 0: off)" if handoff
                        else f"Refiner steps (img2img at strength {REFINER_STRENGTH}; 0: off)")
                    high_noise_frac = gr.Slider(0.05, 0.95, value=HIGH_NOISE_FRAC, step=0.05, visible=handoff,
                                                label="High-noise fraction (base -> refiner switch)")
                with gr.Row():
                    width = gr.Slider(4 * f, max(1024, 2 * size), value=size, step=f, label="Width")
                    height = gr.Slider(4 * f, max(1024, 2 * size), value=size, step=f, label="Height")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                    randomize = gr.Checkbox(value=True, label="Randomize seed")
                    sampler = gr.Dropdown(list(SAMPLERS), value="dpmpp_2m", label="Sampler")
                with gr.Row():
                    n_candidates = gr.Slider(1, 16, value=4, step=1, label="Candidates")
                    rerank = gr.Checkbox(value=reranker is not None, interactive=reranker is not None,
                                         label="Order by CLIP score")
                button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Candidates, best first", columns=4, object_fit="contain", format="png")
                parameters = gr.Textbox(label="PNG metadata (parameters) of the selected image", lines=4,
                                        interactive=False)
        per_image = gr.State([])
        inputs = [prompt, negative, scale, width, height, steps, refiner_steps, high_noise_frac, seed, randomize,
                  sampler, n_candidates, rerank, prompt_syntax, clip_skip]
        outputs = [gallery, parameters, seed, per_image]
        button.click(run, inputs, outputs, api_name="generate")
        prompt.submit(run, inputs, outputs, api_name=False)
        gallery.select(show_parameters, [per_image], [parameters], api_name=False)
    demo.sdjax_outdir = outdir  # where the PNGs go (for launch's allowed_paths)
    return demo


def load_models(model=None, rerank_model=None, refiner_model=None):
    """(pipe, reranker or None, refiner or None); defaults: the shipped model (or $SDJAX_MODEL) and CLIP."""
    from sdjax.app import UsageError, load_pipeline, one_line

    pipe, _, _ = load_pipeline({"ckpt": model})
    refiner = None
    if refiner_model:
        try:
            refiner, _, _ = load_pipeline({"ckpt": refiner_model})
        except UsageError as e:  # load_pipeline names --ckpt
            raise UsageError(str(e).replace(f"--ckpt {refiner_model}", f"--refiner {refiner_model}", 1)) from None
    if rerank_model is None:
        rerank_model = default_clip(with_shipped=not model)
    reranker = None
    if rerank_model:
        from sdjax.rerank import CLIPReranker

        try:
            reranker = CLIPReranker.from_pretrained(rerank_model)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise UsageError(f"--rerank-model {rerank_model}: cannot load: {one_line(e)}") from None
    return pipe, reranker, refiner


def launch(model=None, rerank_model=None, host: str = "127.0.0.1", port: int | None = None, refiner_model=None,
           block: bool = True, lora_dirs=(), embeddings_dirs=()):
    """Load the models and serve the UI on http://host:port (port None: Gradio's 7860 or the next free one).
    block=False returns the running `gr.Blocks` (close it with `.close()`). lora_dirs: where prompts'
    `<lora:NAME:WEIGHT>` tags find their files; embeddings_dirs: A1111's embeddings folders."""
    from sdjax.app import PromptLoras, UsageError

    _gradio()
    for flag, dirs in (("--lora-dir", lora_dirs), ("--embeddings-dir", embeddings_dirs)):  # before the models load
        for d in dirs:
            if not Path(d).expanduser().is_dir():
                raise UsageError(f"{flag} {d}: no such folder")
    pipe, reranker, refiner = load_models(model, rerank_model, refiner_model)
    loras = PromptLoras(pipe, (), lora_dirs) if lora_dirs else None
    embeddings = EmbeddingFolders(tuple(embeddings_dirs)) if embeddings_dirs else None
    demo = build_demo(pipe, reranker, refiner, loras, embeddings)
    demo.queue(default_concurrency_limit=1)  # one generation at a time: the devices are shared by all users
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                allowed_paths=[str(demo.sdjax_outdir)], share=False)
    return demo


def cmd_demo(args) -> int:
    """`sdjax demo`: flags from sdjax.cli."""
    from sdjax.app import UsageError

    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    _gradio()
    launch(args.ckpt, args.rerank_model, host=args.host, port=args.port, refiner_model=args.refiner,
           lora_dirs=args.lora_dir or (), embeddings_dirs=args.embeddings_dir or ())
    return 0


__all__ = ["Candidate", "EmbeddingFolders", "build_demo", "default_clip", "generate", "is_sdxl_handoff", "launch",
           "load_models"]
