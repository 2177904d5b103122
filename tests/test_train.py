"""Training: the shapes data, resuming after a kill, device-count independence, fine-tuning, the UNet's objective
(from the model's scheduler config, against diffusers' DDPMScheduler), and the shipped model.

Training runs here use tiny networks and a few steps; runs that must be killed or need 8 fake devices run in a
subprocess (XLA_FLAGS must be set before jax starts).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdjax import data

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "sdjax" / "default_model"

VAE = dict(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4, sample_size=16,
           mid_block_add_attention=False)
CLIP = dict(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=49408, max_position_embeddings=77),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=16, patch_size=8), projection_dim=8)
UNET = dict(sample_size=8, block_out_channels=[16, 16], layers_per_block=1, norm_num_groups=4,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=16, attention_head_dim=2)


def vae_run(ckpt, kill_at, out):
    """6 steps of a tiny VAE with checkpoints every 2 steps, resuming from `ckpt`; at step `kill_at` the process
    waits for the step-2 checkpoint to be committed (orbax renames it into place) and kills itself (SIGKILL)."""
    import signal
    import time

    from sdjax import train
    from sdjax.loading import state_dict
    from sdjax.models import AutoencoderKL

    kill_at = int(kill_at)  # arguments arrive as strings from the command line
    cfg = train.TrainConfig(steps=6, batch_size=4, warmup=2, checkpoint_every=2, seed=1)
    source = train._vae_batches(data.synthetic_batches(1, 4, size=16), 1, None)

    def batches(step):
        if step == kill_at:
            while not (Path(ckpt) / "2").is_dir():
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGKILL)
        return source(step)

    model = AutoencoderKL.from_config(VAE, seed=0)
    model, losses = train.fit(model, train.vae_loss(1e-3), batches, cfg, checkpoint_dir=ckpt, resume=True,
                              progress=False)
    np.savez(out, losses=losses, **state_dict(model))


def device_run():
    """Losses of 2 UNet steps (frozen VAE and text encoder, CFG dropout) on 1 device and on 8, as JSON."""
    import jax

    from sdjax import train
    from sdjax.models import AutoencoderKL, CLIPModel, UNet2DConditionModel
    from sdjax.distributed import data_mesh
    from sdjax.tokenizer import Tokenizer

    assert len(jax.devices()) == 8, jax.devices()
    te = train.text_encoder_from_clip(CLIPModel.from_config(CLIP, seed=0))
    vae = AutoencoderKL.from_config(VAE, seed=0)
    batches = train._unet_batches(data.synthetic_batches(0, 8, size=16), Tokenizer.from_pretrained(None), 77)
    cfg = train.TrainConfig(steps=2, batch_size=8, warmup=1, cfg_dropout=0.5)
    out = {}
    for n in (1, 8):
        unet = UNet2DConditionModel.from_config(UNET, seed=0)
        _, losses = train.fit(unet, train.unet_loss(cfg, 0.5, train.SCHEDULER_CONFIG), batches, cfg, frozen=(te, vae),
                              mesh=data_mesh(jax.devices()[:n]), progress=False)
        out[n] = losses.tolist()
    print(json.dumps(out))


def _run(call, *args, devices=1, check=True):
    """`test_train.<call>(*args)` in a fresh Python (XLA_FLAGS take effect only before jax starts)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    script = f"import test_train; test_train.{call}(*{[str(a) for a in args]!r})"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


# ----------------------------------------------------------------------------------------------------------------
# Data


def test_captions_and_split():
    assert len(data.ALL_COMBOS) == 3 * 8 * 7
    assert set(data.TRAIN).isdisjoint(data.HELD_OUT)
    assert set(data.TRAIN) | set(data.HELD_OUT) == set(data.ALL_COMBOS)
    assert 0.15 <= len(data.HELD_OUT) / len(data.ALL_COMBOS) <= 0.25
    assert data.HELD_OUT == data._split()[1]  # deterministic
    for s, c, b in data.HELD_OUT:  # every part of a held-out combination is seen in training
        assert any(t[:2] == (s, c) for t in data.TRAIN) and any(t[1:] == (c, b) for t in data.TRAIN)
    batch = data.batch(0, 3, 64)
    assert batch["images"].shape == (64, 64, 64, 3) and batch["images"].dtype == np.float32
    assert -1 <= batch["images"].min() and batch["images"].max() <= 1
    for text in batch["captions"]:
        words = text.split()
        assert len(words) == 7 and words[0] == "a" and words[3:5] == ["on", "a"] and words[-1] == "background"
        combo = data.parse_caption(text)
        assert combo in data.TRAIN and combo == (words[2], words[1], words[5])
    np.testing.assert_array_equal(batch["images"], data.batch(0, 3, 64)["images"])  # a function of (seed, step)


def test_images_have_the_stated_colours_and_shapes():
    batch = data.batch(1, 0, 48)
    hits = 0
    for image, text in zip(batch["images"], batch["captions"]):
        shape, colour, background = data.parse_caption(text)
        pixels = ((image + 1) / 2).reshape(-1, 3)
        d = np.sum((pixels[:, None] - data.PALETTE[None]) ** 2, -1)
        names = np.asarray(data.COLOUR_NAMES)[d.argmin(1)]
        near = names[d.min(1) < 0.02]  # away from the anti-aliased rim, pixels are one of the two colours
        values, counts = np.unique(near, return_counts=True)
        top = values[np.argsort(-counts)[:2]]
        assert set(top) == {colour, background} and np.isin(near, top).mean() > 0.98, text
        assert np.mean(near == background) > 0.5
        hits += data.classify((image + 1) / 2) == dict(shape=shape, colour=colour, background=background)
    assert hits >= 46  # the procedural classifier used by the evaluation reads them back


# ----------------------------------------------------------------------------------------------------------------
# Training loop


def test_resume_after_kill_continues_exactly(tmp_path):
    # killed with SIGKILL at step 4 (after the step-2 checkpoint), then resumed: same losses, same weights as a
    # run that was never interrupted
    proc = _run("vae_run", tmp_path / "ckpt", 4, tmp_path / "a.npz", check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    steps = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert steps and max(steps) < 6
    _run("vae_run", tmp_path / "ckpt", -1, tmp_path / "resumed.npz")
    vae_run(tmp_path / "fresh", -1, tmp_path / "fresh.npz")  # here: no kill
    resumed, fresh = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "fresh.npz")
    assert np.all(fresh["losses"] > 0)
    np.testing.assert_allclose(resumed["losses"], fresh["losses"], rtol=1e-6)
    for k in fresh.files:
        np.testing.assert_allclose(resumed[k], fresh[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_loss_same_on_8_devices_as_on_1():
    proc = _run("device_run", devices=8)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["8"], out["1"], rtol=1e-5)
    assert out["1"][0] > 0


def test_finetune_pipeline_unet_on_image_folder(tmp_path):
    from PIL import Image

    from pipeline_fixtures import build_pipeline
    from sdjax import StableDiffusionPipeline
    from sdjax.train import TrainConfig, train_stage

    base = build_pipeline(tmp_path / "base")
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, (s, c, b) in enumerate(data.TRAIN[:3]):
        image = data.render([s], [c], [b], np.random.default_rng(i), size=40)[0]
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "caption": data.caption(s, c, b)}))
    (folder / "captions.jsonl").write_text("\n".join(rows) + "\n")
    result = train_stage("unet", tmp_path / "tuned", TrainConfig(steps=2, batch_size=2, warmup=1),
                         data=folder, pipeline=base, progress=False)
    assert result["losses"].shape == (2,) and np.all(result["losses"] > 0)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tuned")
    before = StableDiffusionPipeline.from_pretrained(base)
    a = np.asarray(pipe.unet.conv_in.kernel.get_value())
    b = np.asarray(before.unet.conv_in.kernel.get_value())
    assert not np.allclose(a, b)  # the UNet changed; the rest is the base pipeline's
    np.testing.assert_array_equal(np.asarray(pipe.vae.decoder.conv_out.kernel.get_value()),
                                  np.asarray(before.vae.decoder.conv_out.kernel.get_value()))


def test_cli_train_bad_input(tmp_path, capsys):
    from sdjax.cli import main

    assert main(["train", "unet", "--out", str(tmp_path / "o")]) == 2
    assert "--vae and --clip" in capsys.readouterr().err
    assert main(["train", "vae", "--out", str(tmp_path / "o"), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["train", "vae", "--out", str(tmp_path / "o"), "--data", str(tmp_path)]) == 2
    assert "captions.jsonl" in capsys.readouterr().err
    assert main(["train", "gan", "--out", str(tmp_path / "o")]) == 2


# ----------------------------------------------------------------------------------------------------------------
# The UNet's training objective: from the scheduler config of the model, as diffusers' DDPMScheduler defines it

SD2_V = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
             beta_schedule="scaled_linear", prediction_type="v_prediction", timestep_spacing="trailing",
             clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _ddpm_reference(config):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)


def _x0_noise_t(T, shape=(6, 8, 8, 4), seed=0):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    t = np.concatenate([[0, 1, T // 2, T - 1], rng.integers(0, T, shape[0] - 4)]).astype(np.int32)
    return x0, noise, t


@pytest.mark.parametrize("config", [
    SD2_V,
    dict(_class_name="DDPMScheduler", beta_schedule="linear", num_train_timesteps=500, beta_start=2e-4,
         beta_end=0.03, prediction_type="v_prediction"),
    dict(_class_name="EulerDiscreteScheduler", beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
         timestep_spacing="linspace"),
], ids=["sd2_scaled_linear", "linear_500", "squaredcos"])
def test_objective_matches_diffusers_add_noise_and_get_velocity(config):
    import torch

    from sdjax.train import TrainObjective

    ref = _ddpm_reference(config)
    obj = TrainObjective.from_scheduler_config(config)
    T = ref.config.num_train_timesteps
    assert obj.prediction_type == "v_prediction" and obj.num_train_timesteps == T == len(ref.alphas_cumprod)
    np.testing.assert_allclose(obj.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=0)
    x0, noise, t = _x0_noise_t(T)
    args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t).long())
    np.testing.assert_allclose(np.asarray(obj.add_noise(x0, noise, t)), ref.add_noise(*args).numpy(), rtol=0,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(obj.target(x0, noise, t)), ref.get_velocity(*args).numpy(), rtol=0,
                               atol=1e-6)


def test_objective_epsilon_and_sample_targets():
    from sdjax.train import SCHEDULER_CONFIG, TrainObjective

    x0, noise, t = _x0_noise_t(1000)
    eps = TrainObjective.from_scheduler_config(SCHEDULER_CONFIG)
    assert eps.prediction_type == "epsilon"
    np.testing.assert_array_equal(np.asarray(eps.target(x0, noise, t)), noise)
    sample = TrainObjective.from_scheduler_config(dict(SCHEDULER_CONFIG, prediction_type="sample"))
    np.testing.assert_array_equal(np.asarray(sample.target(x0, noise, t)), x0)
    # options that only change sampling are accepted; a file without prediction_type is epsilon, as in diffusers
    relaxed = dict(SCHEDULER_CONFIG, thresholding=True, clip_sample=True, timestep_spacing="trailing")
    del relaxed["prediction_type"]
    assert TrainObjective.from_scheduler_config(relaxed).prediction_type == "epsilon"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_unet_loss_regresses_on_the_configs_target(prediction_type):
    # stand-ins: the VAE returns the images as latents, the UNet is an oracle that knows x0 and returns diffusers'
    # target for (x_t, t) of this config: the loss is ~0 only if unet_loss noises and targets as diffusers does
    # (and draws t within the config's 500 training steps: the oracle's torch indexing would fail otherwise)
    from types import SimpleNamespace

    import jax
    import jax.numpy as jnp
    import torch

    from sdjax import train

    config = dict(_class_name="DDPMScheduler", beta_schedule="linear", num_train_timesteps=500,
                  prediction_type=prediction_type)
    ref = _ddpm_reference(config)
    acp = ref.alphas_cumprod.numpy()
    x = np.random.default_rng(0).standard_normal((8, 4, 4, 4)).astype(np.float32)
    scaling = 0.5
    vae = SimpleNamespace(encode=lambda im: SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda k: im)))

    def text_encoder(ids):
        return SimpleNamespace(last_hidden_state=jnp.zeros((ids.shape[0], ids.shape[1], 8)))

    def oracle(kind):
        def unet(noisy, t, context):
            x0, xt, tt = x * scaling, np.asarray(noisy), torch.from_numpy(np.array(t)).long()
            a = acp[tt.numpy()][:, None, None, None]
            noise = (xt - np.sqrt(a) * x0) / np.sqrt(1 - a)
            if kind == "epsilon":
                return jnp.asarray(noise)
            if kind == "sample":
                return jnp.asarray(x0)
            return jnp.asarray(ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy())
        return unet

    ids = np.zeros((8, 77), np.int32)
    batch = {"images": jnp.asarray(x), "input_ids": ids, "empty_ids": ids}
    loss = train.unet_loss(train.TrainConfig(), scaling, config)
    for kind in train.PREDICTION_TYPES:
        value = float(loss(oracle(kind), (text_encoder, vae), batch, jax.random.key(1)))
        assert (value < 1e-8) if kind == prediction_type else (value > 1e-2), (kind, value)


def test_unet_loss_same_as_before_for_the_default_config():
    # unet_loss before the objective came from the scheduler config: SD1's scaled_linear table in float64 rounded
    # to float32. The table now is diffusers' (float32 betas, as the pipeline's samplers use it); 986 of the 1000
    # values differ from the old one by a few ulps, so the losses agree to float32 rounding, not bit for bit.
    import jax
    import jax.numpy as jnp

    from sdjax import train
    from sdjax.models import AutoencoderKL, CLIPModel, UNet2DConditionModel
    from sdjax.tokenizer import Tokenizer

    def old_unet_loss(cfg, scaling_factor):
        betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
        acp = jnp.asarray(np.cumprod(1.0 - betas).astype(np.float32))

        def loss(unet, frozen, batch, key):
            text_encoder, vae = frozen
            x = batch["images"]
            b = x.shape[0]
            k_lat, k_t, k_noise, k_drop = jax.random.split(key, 4)
            latents = jax.lax.stop_gradient(vae.encode(x).latent_dist.sample(k_lat)) * scaling_factor
            drop = jax.random.uniform(k_drop, (b,)) < cfg.cfg_dropout
            ids = jnp.where(drop[:, None], batch["empty_ids"], batch["input_ids"])
            context = jax.lax.stop_gradient(text_encoder(ids).last_hidden_state)
            t = jax.random.randint(k_t, (b,), 0, 1000)
            noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
            a = acp[t][:, None, None, None]
            noisy = jnp.sqrt(a) * latents + jnp.sqrt(1 - a) * noise
            pred = unet(noisy, t, context).astype(jnp.float32)
            return jnp.mean((pred - noise) ** 2)

        return loss

    frozen = (train.text_encoder_from_clip(CLIPModel.from_config(CLIP, seed=0)), AutoencoderKL.from_config(VAE, seed=0))
    unet = UNet2DConditionModel.from_config(UNET, seed=0)
    batch = train._unet_batches(data.synthetic_batches(0, 4, size=16), Tokenizer.from_pretrained(None), 77)(0)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    cfg = train.TrainConfig(cfg_dropout=0.5)
    for seed in range(3):
        key = jax.random.key(seed)
        new = float(train.unet_loss(cfg, 0.5, train.SCHEDULER_CONFIG)(unet, frozen, batch, key))
        old = float(old_unet_loss(cfg, 0.5)(unet, frozen, batch, key))
        np.testing.assert_allclose(new, old, rtol=2e-6)


@pytest.mark.parametrize("change, message", [
    (dict(prediction_type="flow_prediction"), "prediction_type='flow_prediction' cannot be trained"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True is not supported for training"),
    (dict(_class_name="DDPMScheduler", variance_type="learned_range"), "variance_type='learned_range'"),
    (dict(_class_name="EulerDiscreteScheduler", timestep_type="continuous"), "timestep_type='continuous'"),
    (dict(beta_schedule="sigmoid"), "beta_schedule='sigmoid' is not supported"),
    (dict(_class_name="FlowMatchEulerDiscreteScheduler", shift=3.0), "FlowMatchEulerDiscreteScheduler is not"),
])
def test_objective_refuses_what_it_cannot_train(change, message):
    from sdjax.train import SCHEDULER_CONFIG, TrainObjective

    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as e:
        TrainObjective.from_scheduler_config(dict(SCHEDULER_CONFIG, **change))
    assert "\n" not in str(e.value)


def test_finetune_uses_the_pipelines_objective(tmp_path, monkeypatch, capsys):
    import torch

    from pipeline_fixtures import build_pipeline
    from sdjax import train
    from sdjax.cli import main

    class Stop(Exception):
        pass

    seen = []

    def spy(cfg, scaling_factor, objective):
        seen.append(objective)
        raise Stop

    base = build_pipeline(tmp_path / "sd2", kind="sd2")
    monkeypatch.setattr(train, "unet_loss", spy)
    with pytest.raises(Stop):
        train.train_stage("unet", tmp_path / "tuned", train.TrainConfig(steps=1, batch_size=2), pipeline=base,
                          progress=False)
    ref = _ddpm_reference(json.loads((base / "scheduler" / "scheduler_config.json").read_text()))
    assert seen[0].prediction_type == "v_prediction"
    np.testing.assert_allclose(seen[0].alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=0)
    assert ref.alphas_cumprod.dtype == torch.float32

    # a scheduler config it cannot train: one line from the CLI, before any model is loaded
    bad = tmp_path / "bad"
    (bad / "scheduler").mkdir(parents=True)
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(SD2_V, prediction_type="flow")))
    capsys.readouterr()
    assert main(["train", "unet", "--out", str(tmp_path / "o"), "--pipeline", str(bad), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "prediction_type='flow' cannot be trained" in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------------------------------------------
# The shipped model

needs_model = pytest.mark.skipif(not (SHIPPED / "pipeline" / "model_index.json").is_file(),
                                 reason="no shipped model in sdjax/default_model")


@needs_model
def test_shipped_model_layout_and_size():
    files = [f for f in SHIPPED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 40 * 10**6
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".ckpt", ".pt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (SHIPPED / "pipeline" / part).is_dir()
    assert (SHIPPED / "clip" / "preprocessor_config.json").is_file()


@needs_model
def test_shipped_tokenizer_files_are_one_copy():
    # the pipeline's tokenizer folder is sdjax's packaged tokenizer; the CLIP folder links to its files (a wheel
    # stores the links as copies); tokenizer.json (the same vocabulary and merges again, 3.6 MB) is not shipped
    from sdjax.tokenizer import PACKAGED

    tokenizer = SHIPPED / "pipeline" / "tokenizer"
    assert PACKAGED == tokenizer
    names = sorted(f.name for f in tokenizer.iterdir())
    assert names == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    for name in names:
        assert os.path.samefile(SHIPPED / "clip" / name, tokenizer / name), name
    assert not list(SHIPPED.rglob("tokenizer.json"))


@needs_model
def test_shipped_model_same_in_diffusers_and_sdjax():
    import torch
    from diffusers import StableDiffusionPipeline as DiffusersPipeline

    from sdjax import StableDiffusionPipeline

    folder = SHIPPED / "pipeline"
    ref = DiffusersPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    size = pipe.default_size
    prompts = ["a red circle on a blue background", "a white triangle on a black background"]
    latents = np.random.default_rng(0).standard_normal((2, size // 4, size // 4, 4)).astype(np.float32)
    want = ref(prompts, num_inference_steps=4, guidance_scale=7.5, output_type="np",
               latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())).images
    got = pipe(prompts, num_inference_steps=4, guidance_scale=7.5, output_type="np", latents=latents).images
    assert np.asarray(got).shape == want.shape == (2, size, size, 3)
    np.testing.assert_allclose(np.asarray(got), want, atol=5e-4)


@needs_model
def test_shipped_clip_loads_in_transformers():
    import torch
    import transformers

    from sdjax.rerank import CLIPReranker

    folder = SHIPPED / "clip"
    ref = transformers.CLIPModel.from_pretrained(folder, torch_dtype=torch.float32)
    processor = transformers.CLIPProcessor.from_pretrained(folder)
    images = [data.render(["circle"], ["red"], ["blue"], np.random.default_rng(0))[0],
              data.render(["square"], ["green"], ["white"], np.random.default_rng(1))[0]]
    images = [(im * 255).astype(np.uint8) for im in images]
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding="max_length")
    with torch.no_grad():
        want = ref(**inputs).logits_per_image.numpy()
    got = CLIPReranker.from_pretrained(folder).score(images, prompts)
    # The checkpoint is float16; both sides upcast it exactly and compute in float32, so this is float32 parity:
    # measured 1.9e-6 on scores of about 16 (logit scale 17.4); 1e-5 is the per-network bound.
    np.testing.assert_allclose(got, np.diag(want), rtol=0, atol=1e-5)
