"""Training the three networks of a text-to-image model with sdjax's own modules: VAE, CLIP, UNet.

One loop (`fit`) serves every stage: optax AdamW with linear warmup and cosine decay, gradient clipping, an EMA of
the weights, data parallelism over a `data` mesh (the batch is split over devices, weights and optimizer state are
replicated; one `jax.jit` with `NamedSharding`s), orbax checkpoints (async and atomic; `resume=True` continues
from the newest one) and a tqdm bar showing the loss. Batch `step` and the random key of step `step` are pure
functions of (seed, step), so a resumed run computes the same numbers as an uninterrupted one, and the loss does
not depend on the number of devices (same global batch).

Stages (`train_stage`):
- "vae": KL autoencoder, L1 + L2 reconstruction + a small KL term; `scaling_factor` is set afterwards to
  1 / std of the latents, as SD's 0.18215 was.
- "clip": text and vision towers, symmetric contrastive loss (captions that are equal count as matches), the real
  CLIP tokenizer.
- "unet": denoising on VAE latents * scaling_factor, conditioned on the frozen text encoder's last hidden
  state, with `cfg_dropout` of the prompts replaced by "" (for classifier-free guidance). The noise schedule, the
  timestep range and the regression target (epsilon, v_prediction or sample) are those of the scheduler config
  of the model (`TrainObjective`): a pipeline folder's own (`pipeline=`: fine-tunes that pipeline's UNet), else
  `SCHEDULER_CONFIG` (SD 1.x's, which the shipped model uses).

Every stage writes a folder that diffusers/transformers can load (the EMA weights); "unet" writes a complete
diffusers pipeline folder.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sdjax.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

STAGES = ("vae", "clip", "unet")

# The shipped model's sizes (CPU-trainable: 64x64 images, 16x16x4 latents).
VAE_CONFIG = dict(
    block_out_channels=[16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, latent_channels=4, norm_num_groups=8,
    sample_size=64, mid_block_add_attention=False,
)
CLIP_CONFIG = dict(
    text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", pad_token_id=49407),
    vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       image_size=64, patch_size=8, hidden_act="quick_gelu"),
    projection_dim=64,
)
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=4, norm_num_groups=16,
)  # cross_attention_dim: the text encoder's width; attention at 8x8 only (cheap, and enough for global layout)
# SD 1.x's scheduler config as SD ships it (a DDIM sampler; scaled_linear betas, epsilon prediction): the shipped
# model's, and the training objective of a UNet trained from scratch
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
}
CLIP_MEAN = np.asarray(OPENAI_CLIP_MEAN, np.float32)
CLIP_STD = np.asarray(OPENAI_CLIP_STD, np.float32)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one run."""

    steps: int = 1000
    batch_size: int = 32  # global: split over the devices of the mesh
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    kl_weight: float = 1e-3  # vae: weight of KL(q(z|x) || N(0, 1)) per latent element vs. per-pixel recon
    cfg_dropout: float = 0.1  # unet: fraction of prompts replaced by ""
    crop: int | None = None  # vae: train on random crops of this size (the VAE is convolutional: cheaper steps)

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"TrainConfig {name} must be an integer of at least 1, got {value!r}")
        for name, low, high in (("lr", 0.0, None), ("weight_decay", 0.0, None), ("clip_norm", 0.0, None),
                                ("ema_decay", 0.0, 1.0), ("kl_weight", 0.0, None), ("cfg_dropout", 0.0, 1.0)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                    or not math.isfinite(value) or value < low or (high is not None and value > high)
                    or (name == "lr" and value == 0)):
                where = f"in [{low}, {high}]" if high is not None else ("above 0" if name == "lr" else "at least 0")
                raise ValueError(f"TrainConfig {name} must be a finite number {where}, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, np.integer)) or self.warmup < 0:
            raise ValueError(f"TrainConfig warmup must be an integer of at least 0, got {self.warmup!r}")


class TrainingDivergedError(FloatingPointError, ValueError):
    """The loss or the weights became NaN or infinite: the run stops and writes no model."""


# ----------------------------------------------------------------------------------------------------------------
# The loop


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any
    opt_state: Any
    ema: Any
    step: jax.Array
    losses: jax.Array  # (steps,) loss of every step so far (zeros after `step`)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup, 1), max(cfg.steps, cfg.warmup + 1),
                                                  end_value=cfg.lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay))


def _ema_decay(cfg, step):
    # warm up the EMA so that early weights do not linger (step 0: 0.1, step 100: ~0.9)
    return jnp.minimum(cfg.ema_decay, (1.0 + step) / (10.0 + step))


def fit(model: nnx.Module, loss_fn: Callable, batches: Callable[[int], dict], cfg: TrainConfig, *,
        frozen: tuple = (), checkpoint_dir: str | Path | None = None, resume: bool = False, mesh=None,
        progress: bool = True, description: str = "train") -> tuple[nnx.Module, np.ndarray]:
    """Train `model` in place for `cfg.steps` steps; returns (the model with EMA weights, losses (steps,)).

    loss_fn(model, frozen_models, batch, key) -> scalar: the batch is a dict of arrays (B, ...) split over `data`.
    batches(step) -> that dict as numpy arrays (global batch), a pure function of step.
    frozen: modules used but not trained (e.g. the VAE and text encoder of the UNet stage), replicated.
    checkpoint_dir: orbax checkpoints every `cfg.checkpoint_every` steps and at the end; resume=True starts from the
    newest one there (and from scratch when there is none).
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    from sdjax.distributed import data_mesh

    mesh = mesh or data_mesh()
    n_dev = mesh.devices.size
    if cfg.batch_size % n_dev:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of the {n_dev} devices of the mesh")
    replicated, batched = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    frozen_defs = tuple(nnx.graphdef(m) for m in frozen)
    frozen_states = jax.device_put(tuple(nnx.state(m) for m in frozen), replicated)
    tx = make_optimizer(cfg)
    params = jax.device_put(params, replicated)
    rest = jax.device_put(rest, replicated)
    # everything committed to the replicated sharding up front: the step's outputs come back so, and a different
    # input sharding on step 2 would compile the step a second time
    state = jax.device_put(TrainState(params, tx.init(params), jax.tree.map(jnp.copy, params),
                                      jnp.zeros((), jnp.int32), jnp.zeros((cfg.steps,), jnp.float32)), replicated)

    def train_step(state: TrainState, rest, frozen_states, batch):
        key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
        frozen_models = tuple(nnx.merge(d, s) for d, s in zip(frozen_defs, frozen_states))

        def loss_of(p):
            return loss_fn(nnx.merge(graphdef, p, rest), frozen_models, batch, key)

        loss, grads = jax.value_and_grad(loss_of)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = _ema_decay(cfg, state.step.astype(jnp.float32))
        ema = jax.tree.map(lambda e, p: e * d + p * (1 - d), state.ema, params)
        losses = state.losses.at[state.step].set(loss)
        return TrainState(params, opt_state, ema, state.step + 1, losses), loss

    step_fn = jax.jit(train_step, in_shardings=(replicated, replicated, replicated, batched),
                      out_shardings=(replicated, replicated), donate_argnums=(0,))

    manager = None
    if checkpoint_dir is not None:
        options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=cfg.checkpoint_every,
                                               enable_async_checkpointing=True)
        manager = ocp.CheckpointManager(Path(checkpoint_dir).absolute(), options=options)
        if resume and manager.latest_step() is not None:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
            latest = manager.latest_step()
            try:
                state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
            except Exception as e:  # noqa: BLE001 (orbax raises many types; all mean this checkpoint does not fit)
                manager.close()  # its threads end now, not in a traceback at exit
                raise ValueError(
                    f"{checkpoint_dir}: cannot resume from the checkpoint of step {latest} "
                    f"({' '.join(str(e).split())[:300] or type(e).__name__}); resume with the settings of that run "
                    "(steps, batch size, model), or start again in an empty checkpoint folder") from None
        elif not resume and manager.latest_step() is not None:
            raise FileExistsError(f"{checkpoint_dir} already has checkpoints: pass resume=True to continue, "
                                  "or use an empty folder")

    start = int(state.step)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=description, disable=not progress,
               dynamic_ncols=True)
    recent = []
    try:
        for step in bar:
            batch = jax.device_put(batches(step), batched)
            state, loss = step_fn(state, rest, frozen_states, batch)
            recent.append(loss)
            checkpoint = manager is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or checkpoint:
                mean = float(np.mean(jax.device_get(recent)))
                if not math.isfinite(mean):  # before a checkpoint of it is written
                    raise TrainingDivergedError(
                        f"training diverged: the loss is {mean} by step {step + 1}; no model is written (lower the "
                        "learning rate, or check the data)")
                bar.set_postfix(loss=f"{mean:.4f}")
                recent = []
            if manager is not None:
                manager.save(step + 1, args=ocp.args.StandardSave(state), force=step + 1 == cfg.steps)
        if not all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.ema)):
            raise TrainingDivergedError("training diverged: the weights are NaN or infinite; no model is written "
                                        "(lower the learning rate)")
    finally:
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
        bar.close()
    nnx.update(model, state.ema)
    return model, np.asarray(jax.device_get(state.losses))


def restore_ema(model: nnx.Module, checkpoint_dir: str | Path, cfg: TrainConfig, step: int | None = None) -> int:
    """Put the EMA weights of a checkpoint of `fit` (the newest, or `step`) into `model`; returns the step.
    For using a run that was stopped before its end."""
    import orbax.checkpoint as ocp

    _, params, _ = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg)
    abstract = jax.eval_shape(lambda p: TrainState(p, tx.init(p), p, jnp.zeros((), jnp.int32),
                                                   jnp.zeros((cfg.steps,), jnp.float32)), params)
    device = jax.local_devices()[0]
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                           sharding=jax.sharding.SingleDeviceSharding(device)),
                            abstract)
    with ocp.CheckpointManager(Path(checkpoint_dir).absolute()) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{checkpoint_dir}: no checkpoints")
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    nnx.update(model, state.ema)
    return int(step)


# ----------------------------------------------------------------------------------------------------------------
# Losses


def vae_loss(kl_weight: float):
    def loss(vae, frozen, batch, key):
        x = batch["images"]
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample(key))
        err = rec.astype(jnp.float32) - x
        kl = jnp.mean(dist.kl()) / np.prod(dist.mean.shape[1:])
        return jnp.mean(jnp.abs(err)) + jnp.mean(err**2) + kl_weight * kl

    return loss


def clip_loss(clip, frozen, batch, key):
    out = clip(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    # equal captions are all correct matches: targets spread over them
    same = batch["caption_ids"][:, None] == batch["caption_ids"][None, :]
    target = same / jnp.sum(same, axis=1, keepdims=True)
    li = -jnp.sum(target * jax.nn.log_softmax(out.logits_per_image, axis=1), axis=1)
    lt = -jnp.sum(target * jax.nn.log_softmax(out.logits_per_text, axis=1), axis=1)
    return 0.5 * (jnp.mean(li) + jnp.mean(lt))


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# diffusers schedulers whose forward process is the discrete DDPM one (alphas_cumprod from betas, integer
# timesteps); diffusers' training scripts noise with a DDPMScheduler built from any of their configs
DDPM_FAMILY = frozenset({
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "SASolverScheduler",
    "LCMScheduler", "TCDScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler",
})
# Scheduler config keys that change the forward process or the target, with the only values sdjax trains;
# the other keys (timestep spacing, clipping, thresholding, solver options) only affect sampling.
_TRAINABLE_VALUES = {
    "rescale_betas_zero_snr": False,  # zero terminal SNR rescales alphas_cumprod
    "variance_type": ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),  # learned: a VLB term
    "timestep_type": "discrete",  # continuous: the UNet sees log-sigmas, not timesteps
    "use_flow_sigmas": False,  # flow matching
}
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr", "_use_default_values")


@dataclasses.dataclass(frozen=True, eq=False)
class TrainObjective:
    """The DDPM forward process and regression target a UNet is trained with, as diffusers' `DDPMScheduler`
    defines them (`add_noise`, `get_velocity`). Arithmetic is float32; arrays are layout-agnostic (the batch axis
    first, e.g. latents `(B, H, W, C)`)."""

    alphas_cumprod: np.ndarray  # (num_train_timesteps,) float32, diffusers' table
    prediction_type: str  # "epsilon", "v_prediction" or "sample"

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "TrainObjective":
        """From a diffusers `scheduler_config.json` dict. A config that sdjax cannot train (another prediction
        type, a non-DDPM scheduler, an option that changes the training maths) raises ValueError."""
        from sdjax import samplers

        name = config.get("_class_name")
        if name is not None and name not in DDPM_FAMILY:
            raise ValueError(f"scheduler {name} is not supported for training: sdjax trains the DDPM noise process "
                             f"(schedulers {', '.join(sorted(DDPM_FAMILY))})")
        defaulted = set(config.get("_use_default_values", ()))
        for key, ok in _TRAINABLE_VALUES.items():
            value = config.get(key)
            if key not in defaulted and value is not None and value not in (ok if isinstance(ok, tuple) else (ok,)):
                raise ValueError(f"scheduler config {key}={value!r} is not supported for training (only {ok!r})")
        prediction_type = "epsilon" if "prediction_type" in defaulted else config.get("prediction_type") or "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler config prediction_type={prediction_type!r} cannot be trained; expected one "
                             f"of {', '.join(PREDICTION_TYPES)}")
        # the class's own defaults for keys the file leaves out, as XScheduler.from_config would use them
        schedule = samplers.SchedulerConfig.from_dict({k: config[k] for k in _SCHEDULE_KEYS if k in config})
        schedule = schedule.for_class(name if name in samplers.DIFFUSERS_CLASS.values() else "DDPMScheduler")
        return cls(samplers.alphas_cumprod(schedule), prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def _coefficients(self, t, ndim):
        a = jnp.asarray(self.alphas_cumprod)[t]
        a = a.reshape(a.shape + (1,) * (ndim - 1))
        return jnp.sqrt(a), jnp.sqrt(1 - a)

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; x0, noise (B, ...), t (B,) int in [0, num_train_timesteps)."""
        sa, sb = self._coefficients(t, x0.ndim)
        return sa * x0 + sb * noise

    def target(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """What the UNet learns to predict from x_t: noise (epsilon), sqrt(a_t) noise - sqrt(1 - a_t) x0
        (v_prediction) or x0 (sample)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        sa, sb = self._coefficients(t, x0.ndim)
        return sa * noise - sb * x0


def unet_loss(cfg: TrainConfig, scaling_factor: float, scheduler_config: dict | TrainObjective):
    """Mean squared error of the UNet's prediction against the target of `scheduler_config` (a diffusers scheduler
    config dict, e.g. `SCHEDULER_CONFIG`, or a `TrainObjective`), timesteps uniform over its training range."""
    objective = (scheduler_config if isinstance(scheduler_config, TrainObjective)
                 else TrainObjective.from_scheduler_config(scheduler_config))

    def loss(unet, frozen, batch, key):
        text_encoder, vae = frozen
        x = batch["images"]
        b = x.shape[0]
        k_lat, k_t, k_noise, k_drop = jax.random.split(key, 4)
        latents = jax.lax.stop_gradient(vae.encode(x).latent_dist.sample(k_lat)) * scaling_factor
        drop = jax.random.uniform(k_drop, (b,)) < cfg.cfg_dropout
        ids = jnp.where(drop[:, None], batch["empty_ids"], batch["input_ids"])
        context = jax.lax.stop_gradient(text_encoder(ids).last_hidden_state)
        t = jax.random.randint(k_t, (b,), 0, objective.num_train_timesteps)
        noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
        noisy = objective.add_noise(latents, noise, t)
        pred = unet(noisy, t, context).astype(jnp.float32)
        return jnp.mean((pred - objective.target(latents, noise, t)) ** 2)

    return loss


# ----------------------------------------------------------------------------------------------------------------
# Batches of each stage


def _tokenize(tokenizer, captions, max_length):
    ids, mask = tokenizer(list(captions), max_length=max_length)
    return ids.astype(np.int32), mask.astype(np.int32)


def clip_pixels(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] at the vision tower's size -> CLIP-normalised pixels (what the reranker feeds it)."""
    return ((images + 1) / 2 - CLIP_MEAN) / CLIP_STD


def _vae_batches(source, seed, crop):
    def get(step):
        images = source(step)["images"]
        if crop is None or crop >= images.shape[1]:
            return {"images": images}
        rng = np.random.default_rng([seed, step, 1])
        y, x = rng.integers(0, images.shape[1] - crop + 1, 2)
        return {"images": np.ascontiguousarray(images[:, y:y + crop, x:x + crop])}

    return get


def _clip_batches(source, tokenizer, max_length):
    def get(step):
        b = source(step)
        ids, mask = _tokenize(tokenizer, b["captions"], max_length)
        caption_ids = np.unique(np.asarray(b["captions"]), return_inverse=True)[1].astype(np.int32)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": clip_pixels(b["images"]),
                "caption_ids": caption_ids}

    return get


def _unet_batches(source, tokenizer, max_length):
    empty = _tokenize(tokenizer, [""], max_length)[0]

    def get(step):
        b = source(step)
        ids, _ = _tokenize(tokenizer, b["captions"], max_length)
        return {"images": b["images"], "input_ids": ids, "empty_ids": np.repeat(empty, len(ids), axis=0)}

    return get


# ----------------------------------------------------------------------------------------------------------------
# Stages


def _source(data, seed, batch_size, size):
    from sdjax import data as data_lib

    if data is None:
        return data_lib.synthetic_batches(seed, batch_size, size=size)
    return data_lib.folder_batches(data, seed, batch_size, size)


def latent_std(vae, source, n_batches: int = 4) -> float:
    """Standard deviation of the VAE's latent means over a few batches (scaling_factor = 1 / this)."""
    encode = nnx.jit(lambda m, x: m.encode(x).latent_dist.mean)
    z = np.concatenate([np.asarray(encode(vae, jnp.asarray(source(10**6 + i)["images"]))) for i in range(n_batches)])
    return float(z.std())


def write_clip_folder(clip, folder: Path, dtype=None) -> None:
    """A transformers `CLIPModel` folder: config, weights, tokenizer files, preprocessor_config.json."""
    from sdjax.tokenizer import PACKAGED

    clip.config = dataclasses.replace(clip.config, architectures=("CLIPModel",))
    clip.save_pretrained(folder, dtype=dtype)
    for f in PACKAGED.iterdir():
        shutil.copy(f, folder / f.name)
    size = clip.config.vision_config.image_size
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN.tolist(),
        "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD.tolist(), "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": size},
    }, indent=2) + "\n")


def text_encoder_from_clip(clip):
    """The pipeline's `CLIPTextModel`: the CLIP model's text tower (same weights)."""
    from sdjax.models.clip import CLIPTextModel

    config = dataclasses.replace(clip.config.text_config, architectures=("CLIPTextModel",))
    te = CLIPTextModel.abstract(config)
    nnx.update(te.text_model, nnx.state(clip.text_model))
    return te


def write_pipeline(folder: Path, *, vae, text_encoder, unet, scheduler_config: dict | None = None,
                   tokenizer_dir: Path | None = None, dtype=None) -> Path:
    """A diffusers `StableDiffusionPipeline` folder from sdjax modules (no safety checker)."""
    from sdjax.tokenizer import PACKAGED

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(folder / "vae", dtype=dtype)
    text_encoder.save_pretrained(folder / "text_encoder", dtype=dtype)
    unet.save_pretrained(folder / "unet", dtype=dtype)
    (folder / "tokenizer").mkdir(exist_ok=True)
    for f in Path(tokenizer_dir or PACKAGED).iterdir():
        if f.is_file():
            shutil.copy(f, folder / "tokenizer" / f.name)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config or SCHEDULER_CONFIG, indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", (scheduler_config or SCHEDULER_CONFIG)["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def train_stage(stage: str, out: str | Path, cfg: TrainConfig = TrainConfig(), *, data: str | Path | None = None,
                vae: str | Path | None = None, clip: str | Path | None = None, pipeline: str | Path | None = None,
                model_config: dict | None = None, scheduler_config: dict | None = None,
                checkpoint_dir: str | Path | None = None, resume: bool = False, mesh=None, progress: bool = True,
                dtype=None) -> dict:
    """Train one stage and write its folder to `out`; returns {"losses": (steps,), "out": Path, ...}.

    data: a folder of images + captions.jsonl, or None for the synthetic shapes data set.
    vae / clip: trained VAE and CLIP folders (unet stage, from scratch). pipeline: a diffusers pipeline folder whose
    UNet is fine-tuned (and whose VAE and text encoder are used). model_config: the new network's config dict
    (default: the shipped model's sizes). scheduler_config: unet from scratch: the new pipeline's diffusers
    scheduler config, which sets the training objective (default `SCHEDULER_CONFIG`); a fine-tuned pipeline
    trains with (and keeps) its own scheduler/scheduler_config.json. A scheduler config sdjax cannot train
    raises ValueError before any model is loaded. checkpoint_dir: default `out`/../`<out name>.checkpoints`.
    dtype: storage dtype of the written weights (e.g. np.float16).
    """
    from sdjax import data as data_lib
    from sdjax.models import AutoencoderKL, CLIPModel, CLIPTextModel, UNet2DConditionModel
    from sdjax.tokenizer import Tokenizer

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():  # found now, not after the training
        raise FileExistsError(errno.EEXIST, "a file, where the output folder should be", str(out))
    if data is not None:
        data_lib.read_caption_folder(data)  # its errors now, before any model is built
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out.parent / f"{out.name}.checkpoints"
    kw = dict(checkpoint_dir=checkpoint_dir, resume=resume, mesh=mesh, progress=progress, description=stage)
    result: dict[str, Any] = {"out": out}

    if stage == "vae":
        config = model_config or VAE_CONFIG
        model = AutoencoderKL.from_config(config, seed=cfg.seed)
        size = model.config.sample_size if isinstance(model.config.sample_size, int) else model.config.sample_size[0]
        source = _source(data, cfg.seed, cfg.batch_size, size)
        model, losses = fit(model, vae_loss(cfg.kl_weight), _vae_batches(source, cfg.seed, cfg.crop), cfg, **kw)
        std = latent_std(model, source)
        model.config = dataclasses.replace(model.config, scaling_factor=round(1.0 / std, 5))
        model.save_pretrained(out, dtype=dtype)
        result.update(losses=losses, scaling_factor=model.config.scaling_factor)
        return result

    tokenizer = Tokenizer.from_pretrained(None)
    if stage == "clip":
        config = model_config or CLIP_CONFIG
        model = CLIPModel.from_config(config, seed=cfg.seed)
        size = model.config.vision_config.image_size
        max_length = model.config.text_config.max_position_embeddings
        source = _source(data, cfg.seed, cfg.batch_size, size)
        model, losses = fit(model, clip_loss, _clip_batches(source, tokenizer, max_length), cfg, **kw)
        write_clip_folder(model, out, dtype=dtype)
        result.update(losses=losses)
        return result

    # unet
    if pipeline is not None:
        if scheduler_config is not None:
            raise ValueError("scheduler_config= is for a UNet trained from scratch; a fine-tuned pipeline trains "
                             "with its own scheduler config")
        pipeline = Path(pipeline)
        scheduler_file = pipeline / "scheduler" / "scheduler_config.json"
        if not scheduler_file.is_file():
            raise FileNotFoundError(f"{scheduler_file}: no such file (the UNet's training objective comes from it)")
        scheduler = json.loads(scheduler_file.read_text())
        objective = TrainObjective.from_scheduler_config(scheduler)
        vae_model = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
        te = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder")
        unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
        tokenizer = Tokenizer.from_pretrained(pipeline / "tokenizer")
        tokenizer_dir = pipeline / "tokenizer"
    else:
        if vae is None or clip is None:
            raise ValueError("the unet stage needs a trained vae= and clip= folder, or pipeline= to fine-tune")
        scheduler = {"_class_name": "DDPMScheduler", **(scheduler_config or SCHEDULER_CONFIG)}
        objective = TrainObjective.from_scheduler_config(scheduler)
        vae_model = AutoencoderKL.from_pretrained(vae)
        te = text_encoder_from_clip(CLIPModel.from_pretrained(clip))
        config = dict(model_config or UNET_CONFIG)
        config.setdefault("cross_attention_dim", te.config.hidden_size)
        unet = UNet2DConditionModel.from_config(config, seed=cfg.seed)
        tokenizer_dir = None
    if unet.config.cross_attention_dim[0] != te.config.hidden_size:
        raise ValueError(f"UNet cross_attention_dim {unet.config.cross_attention_dim[0]} != text encoder width "
                         f"{te.config.hidden_size}")
    size = unet.config.sample_size * vae_model.config.downsample_factor
    source = _source(data, cfg.seed, cfg.batch_size, size)
    loss = unet_loss(cfg, float(vae_model.config.scaling_factor), objective)
    max_length = te.config.max_position_embeddings
    unet, losses = fit(unet, loss, _unet_batches(source, tokenizer, max_length), cfg, frozen=(te, vae_model), **kw)
    write_pipeline(out, vae=vae_model, text_encoder=te, unet=unet, scheduler_config=scheduler,
                   tokenizer_dir=tokenizer_dir, dtype=dtype)
    result.update(losses=losses)
    return result


__all__ = [
    "CLIP_CONFIG", "DDPM_FAMILY", "PREDICTION_TYPES", "SCHEDULER_CONFIG", "STAGES", "TrainConfig",
    "TrainObjective", "UNET_CONFIG", "VAE_CONFIG", "clip_loss", "fit", "make_optimizer", "text_encoder_from_clip",
    "train_stage", "unet_loss", "vae_loss", "write_clip_folder", "write_pipeline",
]
