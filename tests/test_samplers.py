"""sdjax.samplers against diffusers' schedulers: same timesteps, same x after every step, same img2img start, same
add_noise, for every sampler, both prediction types, three step counts and the three timestep spacings.

Both sides are fed the same fake model: a numpy function of the scaled model input and the call index (a denoiser
towards a fixed x0, gain <= 4 in its input, plus fixed random arrays per call). The stochastic samplers get the
same noise: diffusers' `randn_tensor` is replaced in the scheduler modules by one that returns sdjax's noise.

Tolerance: 1e-5 max abs difference at every step (observed: up to 7.6e-6, Heun with 4 steps; mostly ~1e-6). The
two sides are not bit-identical for reasons outside the samplers' logic: torch computes `** 0.5` through MKL (an ulp
off numpy's correctly rounded sqrt in ~20% of the table entries) and fills `linspace` in SIMD chunks; under jit XLA
contracts multiply-adds into FMAs. These are ulps of |x| <= 44 (SD's sigma_max is 14.6); a logic error shows as 1e-3
or more. (XLA's rewrite of x / s into x * (1 / s) is avoided in the samplers themselves, see `samplers._div`.)
"""
import inspect
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

from sdjax import samplers
from sdjax.samplers import DIFFUSERS_CLASS, SAMPLERS, SchedulerConfig, make_sampler

torch.set_num_threads(1)

ATOL = 1e-5
SHAPE = (2, 4, 8, 8)

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (no timestep_spacing: each class's default)
SD1_FILE = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
# stabilityai/stable-diffusion-2 scheduler/scheduler_config.json
SD2_FILE = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}


def sd_config(spacing, prediction_type="epsilon", **extra):
    return {**SD1_FILE, "timestep_spacing": spacing, "prediction_type": prediction_type, **extra}


def diffusers_scheduler(name, config, n):
    sch = getattr(diffusers, DIFFUSERS_CLASS[name]).from_config(samplers.diffusers_config(name, config))
    sch.set_timesteps(n)
    return sch


class FakeModel:
    """eps (or v) of a denoiser towards X0 with its gain capped at 4, plus 0.1 * a fixed random array per call."""

    X0 = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)

    def __init__(self, sch, prediction_type, num_calls):
        ac = sch.alphas_cumprod.numpy()
        t = np.clip(np.round(sch.timesteps.numpy().astype(np.float64)), 0, len(ac) - 1).astype(int)
        a = ac[t].astype(np.float32)
        self.sa, self.sb = np.sqrt(a), np.sqrt(np.float32(1) - a)
        self.inv = (np.float32(1) / np.maximum(self.sb, np.float32(0.25))).astype(np.float32)
        self.r = np.random.default_rng(2).standard_normal((num_calls, *SHAPE)).astype(np.float32)
        self.v = prediction_type == "v_prediction"

    def __call__(self, x_in, i):
        i = int(i)
        eps = (np.asarray(x_in, np.float32) - self.sa[i] * self.X0) * self.inv[i] + np.float32(0.1) * self.r[i]
        return self.sa[i] * eps - self.sb[i] * self.X0 if self.v else eps

    def jax(self, x_in, i):
        return jax.pure_callback(self, jax.ShapeDtypeStruct(x_in.shape, jnp.float32), x_in, i)


@pytest.fixture
def noise_feed(monkeypatch):
    """Makes diffusers' euler_a and ddpm draw `feed.noise` instead of random numbers."""
    feed = types.SimpleNamespace(noise=None)

    def randn_tensor(shape, *args, **kwargs):
        assert tuple(shape) == SHAPE
        return torch.from_numpy(feed.noise.copy())

    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", randn_tensor)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", randn_tensor)
    return feed


def step_noises(num_calls):
    return np.random.default_rng(3).standard_normal((num_calls, *SHAPE)).astype(np.float32)


def initial_x(sch, start):
    """txt2img: N0 * init_noise_sigma; img2img: add_noise(X0, N0, timesteps[start]) as the pipeline does."""
    n0 = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    if start == 0:
        return n0 * np.float32(sch.init_noise_sigma)
    t = sch.timesteps[start:start + 1]
    return sch.add_noise(torch.from_numpy(FakeModel.X0), torch.from_numpy(n0), t).numpy()


def run_diffusers(sch, model, x, start, noises, feed):
    """diffusers' denoising loop from call `start` (after set_begin_index where the class has it)."""
    xs, x = [], torch.from_numpy(x.copy())
    for i in range(start, len(sch.timesteps)):
        t = sch.timesteps[i]
        out = torch.from_numpy(model(sch.scale_model_input(x, t).numpy(), i))
        feed.noise = noises[i]
        x = sch.step(out, t, x).prev_sample
        xs.append(x.numpy())
    return np.stack(xs)


def run_sdjax(sp, model, x, start, noises):
    """The same loop with sdjax, eagerly, one step at a time."""
    xs, x = [], jnp.asarray(x)
    state = sp.init_state(x, start)
    for i in range(start, sp.num_calls):
        out = jnp.asarray(model(sp.scale_model_input(x, i), i))
        x, state = sp.step(state, out, i, x, noise=jnp.asarray(noises[i]))
        xs.append(np.asarray(x))
    return np.stack(xs)


def assert_steps_close(got, ref, scale_tol=False):
    """Every step within ATOL; with scale_tol, within ATOL * |x| / 10 where |x| > 10 (float32 spacing grows with
    |x|: schedules whose sigma_max is far above SD's 14.6 put |x| in the hundreds or thousands)."""
    assert got.shape == ref.shape
    for k, (g, r) in enumerate(zip(got, ref)):
        tol = ATOL * max(1.0, float(np.abs(r).max()) / 10) if scale_tol else ATOL
        same = (g == r) | (np.isnan(g) & np.isnan(r))  # equal infinities and NaNs count as equal
        with np.errstate(invalid="ignore"):
            diff = float(np.where(same, 0.0, np.abs(g - r)).max())
        assert diff <= tol, f"step {k}: max abs diff {diff:.3g} > {tol:.3g} (|x| max {np.abs(r).max():.3g})"


def check_parity(name, config, n, feed, start=0, scale_tol=False, exact_timesteps=True):
    sch = diffusers_scheduler(name, config, n)
    sp = make_sampler(name, config, n)
    ref_t = sch.timesteps.numpy().astype(np.float32)
    if exact_timesteps:
        np.testing.assert_array_equal(np.asarray(sp.timesteps), ref_t)
    else:  # fractional Karras timesteps come from log(sigma) tables that differ by an ulp
        np.testing.assert_allclose(np.asarray(sp.timesteps), ref_t, rtol=1e-6, atol=1e-4)
    assert sp.num_calls == len(ref_t)
    assert sp.order == sch.order
    assert sp.init_noise_sigma == pytest.approx(float(sch.init_noise_sigma), rel=1e-6)
    if start and hasattr(sch, "set_begin_index"):
        sch.set_begin_index(start)
    model = FakeModel(sch, sch.config.prediction_type, sp.num_calls)
    noises = step_noises(sp.num_calls)
    x = initial_x(sch, start)
    ref = run_diffusers(sch, model, x, start, noises, feed)
    got = run_sdjax(sp, model, x, start, noises)
    assert_steps_close(got, ref, scale_tol)
    return sp, sch


# ---------------------------------------------------------------------------------------------------------------
# Step-by-step parity


@pytest.mark.parametrize("n", [4, 10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_step_parity(name, spacing, prediction_type, n, noise_feed):
    check_parity(name, sd_config(spacing, prediction_type), n, noise_feed)


@pytest.mark.parametrize("config", [SD1_FILE, SD2_FILE], ids=["sd1_file", "sd2_file"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_step_parity_real_config_files(name, config, noise_feed):
    # The files leave timestep_spacing (and more) out: each class then uses its own default, as from_config does.
    check_parity(name, config, 10, noise_feed)


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
@pytest.mark.parametrize("config", [sd_config("leading"), sd_config("trailing", "v_prediction")],
                         ids=["leading_eps", "trailing_v"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_img2img_parity(name, config, strength, noise_feed):
    """Starting mid-schedule: the start index, the noised latents and every step after them."""
    n = 10
    sch = diffusers_scheduler(name, config, n)
    fake_pipe = types.SimpleNamespace(scheduler=sch)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(fake_pipe, n, strength, "cpu")
    start = len(sch.timesteps) - len(timesteps)
    assert make_sampler(name, config, n).index_for_strength(strength) == start
    check_parity(name, config, n, noise_feed, start=start)


@pytest.mark.parametrize(
    "name, extra",
    [
        ("euler", dict(use_karras_sigmas=True)),
        ("lms", dict(use_karras_sigmas=True)),
        ("heun", dict(use_karras_sigmas=True)),
        ("unipc", dict(use_karras_sigmas=True)),
        ("unipc", dict(solver_order=1)),
        ("unipc", dict(solver_order=3)),
        ("unipc", dict(solver_order=3, prediction_type="v_prediction", timestep_spacing="trailing")),
        ("unipc", dict(solver_type="bh1")),
        ("unipc", dict(predict_x0=False)),
        ("unipc", dict(lower_order_final=False)),  # diffusers ends in inf/nan (order 2 onto sigma 0); so do we
        ("unipc", dict(disable_corrector=[0, 2])),
        ("dpmpp_2m", dict(solver_type="heun")),
        ("dpmpp_2m", dict(use_karras_sigmas=True)),  # the name decides: no Karras sigmas
        ("ddpm", dict(variance_type="fixed_large")),
        ("ddpm", dict(clip_sample=True)),
        ("ddim", dict(clip_sample=True, clip_sample_range=0.5)),
        ("ddim", dict(set_alpha_to_one=True)),
        ("pndm", dict(set_alpha_to_one=True)),
        ("heun", dict(clip_sample=True)),
    ],
)
@pytest.mark.parametrize("n", [4, 12])
def test_option_parity(name, extra, n, noise_feed):
    config = {**sd_config("leading"), **extra}
    exact = not (extra.get("use_karras_sigmas") and name in ("euler", "lms", "heun"))
    check_parity(name, config, n, noise_feed, exact_timesteps=exact)


@pytest.mark.parametrize(
    "schedule",
    [
        dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        dict(beta_schedule="squaredcos_cap_v2"),
        "trained_betas",
    ],
    ids=["linear", "squaredcos_cap_v2", "trained_betas"],
)
@pytest.mark.parametrize("name", SAMPLERS)
def test_beta_schedule_parity(name, schedule, noise_feed):
    if schedule == "trained_betas":
        betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2 * 1.05
        schedule = dict(trained_betas=betas.tolist())
    if name == "dpmpp_2m_karras" and schedule.get("beta_schedule") == "squaredcos_cap_v2":
        pytest.skip("diffusers fails here: its Karras timesteps repeat and index_for_timestep runs past the end")
    # linear: sigma_max 157; squaredcos_cap_v2: sigma_max 2e4, so |x| is far above SD's and scale_tol applies.
    check_parity(name, {**sd_config("leading"), **schedule}, 10, noise_feed, scale_tol=True)


def test_alphas_cumprod_tables():
    for schedule in ("scaled_linear", "linear", "squaredcos_cap_v2"):
        d = {**SD1_FILE, "beta_schedule": schedule}
        ours = samplers.alphas_cumprod(SchedulerConfig.from_dict(d).for_class("DDIMScheduler"))
        theirs = diffusers.DDIMScheduler.from_config(d).alphas_cumprod.numpy()
        # torch's SIMD linspace moves a few betas by an ulp
        np.testing.assert_allclose(ours, theirs, rtol=5e-7, err_msg=schedule)


# ---------------------------------------------------------------------------------------------------------------
# The compiled loop: traced i and start inside jax.lax.fori_loop under jax.jit, sampler passed as a pytree.


@pytest.mark.parametrize("config", [sd_config("leading"), sd_config("trailing", "v_prediction")],
                         ids=["leading_eps", "trailing_v"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_jit_fori_loop_parity(name, config, noise_feed):
    n = 10
    sp = make_sampler(name, config, n)
    noises = step_noises(sp.num_calls)
    model = FakeModel(diffusers_scheduler(name, config, n), config["prediction_type"], sp.num_calls)

    traces = []
    calls = sp.num_calls  # a Python int here; inside the jit the sampler's counts are traced values

    @jax.jit
    def loop(sp, x, start, noises):
        traces.append(1)

        def body(i, carry):
            x, state, xs = carry
            out = model.jax(sp.scale_model_input(x, i), i)
            x, state = sp.step(state, out, i, x, noise=noises[i])
            return x, state, xs.at[i].set(x)

        xs = jnp.zeros((calls, *x.shape), jnp.float32)
        return jax.lax.fori_loop(start, sp.num_calls, body, (x, sp.init_state(x, start), xs))[2]

    for start in (0, sp.index_for_strength(0.6)):  # one compilation serves both starts
        sch = diffusers_scheduler(name, config, n)
        if start and hasattr(sch, "set_begin_index"):
            sch.set_begin_index(start)
        x = initial_x(sch, start)
        ref = run_diffusers(sch, model, x, start, noises, noise_feed)
        got = np.asarray(loop(sp, jnp.asarray(x), jnp.int32(start), jnp.asarray(noises)))[start:]
        assert_steps_close(got, ref)
    assert len(traces) == 1


# ---------------------------------------------------------------------------------------------------------------
# add_noise, dtypes, pytree


@pytest.mark.parametrize("name", SAMPLERS)
def test_add_noise_parity(name):
    config = sd_config("trailing", "v_prediction")
    x0 = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
    noise = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    sp = make_sampler(name, config, 10)
    for i in range(sp.num_calls):
        for begin_index in (None, i):
            sch = diffusers_scheduler(name, config, 10)
            if begin_index is not None and hasattr(sch, "set_begin_index"):
                sch.set_begin_index(begin_index)
            ref = sch.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), sch.timesteps[i:i + 1]).numpy()
            got = np.asarray(sp.add_noise(jnp.asarray(x0), jnp.asarray(noise), i))
            np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL, err_msg=f"call {i}")


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler_a", "heun"])
def test_bfloat16_inputs_step_in_float32(name):
    sp = make_sampler(name, sd_config("leading"), 6)
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal(SHAPE) * 3, jnp.bfloat16)
    out = jnp.asarray(rng.standard_normal(SHAPE), jnp.bfloat16)
    noise = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    state16, state32 = sp.init_state(x), sp.init_state(x.astype(jnp.float32))
    for i in range(3):
        x16, state16 = sp.step(state16, out, i, x, noise=noise)
        x32, state32 = sp.step(state32, out.astype(jnp.float32), i, x.astype(jnp.float32), noise=noise)
        assert x16.dtype == jnp.bfloat16 and sp.scale_model_input(x, i).dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x16), np.asarray(x32.astype(jnp.bfloat16)))
        x = x16


def test_sampler_is_a_pytree():
    sp = make_sampler("unipc", SD1_FILE, 8)
    leaves, treedef = jax.tree_util.tree_flatten(sp)
    # tables are arrays; the counts (num_calls, ...) are data too, Python numbers until they are padded
    assert all(isinstance(leaf, (jax.Array, int, float)) for leaf in leaves)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.name == "unipc" and back.num_calls == 8 and back.tables.keys() == sp.tables.keys()
    # padded to a bucket, samplers of different step counts have one tree structure (one compiled program)
    padded = [make_sampler("unipc", SD1_FILE, n).padded(16) for n in (8, 11)]
    assert all(isinstance(leaf, (np.ndarray, np.generic)) for leaf in jax.tree_util.tree_leaves(padded))
    assert jax.tree_util.tree_structure(padded[0]) == jax.tree_util.tree_structure(padded[1])
    assert padded[1].num_calls == 11 and padded[1].timesteps.shape == (16,)


# ---------------------------------------------------------------------------------------------------------------
# Configs


def test_class_defaults_match_diffusers():
    """A key missing from the file takes each class's own constructor default, as diffusers' from_config does."""
    for cls_name in samplers._CLASS_DEFAULTS:
        params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
        resolved = SchedulerConfig().for_class(cls_name)
        for key in samplers._CLASS_KEYS[cls_name]:
            expected = params[key].default
            got = getattr(resolved, key)
            if key == "disable_corrector":
                expected = tuple(expected)
            assert got == expected, f"{cls_name}.{key}: {got!r} != {expected!r}"


def test_use_default_values_are_not_carried_over():
    # A config saved from a DDIM scheduler lists its defaulted keys; an Euler scheduler built from it must use
    # Euler's defaults for those (timestep_spacing "linspace", not DDIM's "leading").
    saved = dict(diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config)
    assert "timestep_spacing" in saved["_use_default_values"]
    for name in ("euler", "dpmpp_2m", "ddim"):
        sch = diffusers_scheduler(name, saved, 10)
        np.testing.assert_array_equal(np.asarray(make_sampler(name, saved, 10).timesteps),
                                      sch.timesteps.numpy().astype(np.float32))


def test_from_dict_ignores_unknown_keys():
    c = SchedulerConfig.from_dict({**SD1_FILE, "some_future_key": 3, "_diffusers_version": "9"})
    assert c.beta_schedule == "scaled_linear" and c.steps_offset == 1 and c.timestep_spacing is None
    assert make_sampler("ddim", c, 5).num_calls == 5


@pytest.mark.parametrize(
    "bad",
    [
        dict(prediction_type="sample"),
        dict(beta_schedule="sigmoid"),
        dict(timestep_spacing="middle"),
        dict(thresholding=True),
        dict(rescale_betas_zero_snr=True),
        dict(use_exponential_sigmas=True),
        dict(final_sigmas_type="sigma_min"),
        dict(variance_type="learned_range"),
        dict(solver_type="euler"),
        dict(num_train_timesteps=10.5),
        dict(trained_betas=[0.01] * 10),
    ],
)
def test_bad_config_values_raise(bad):
    with pytest.raises(ValueError, match="scheduler config"):
        make_sampler("ddim", {**SD1_FILE, **bad}, 10)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="valid names: ddim, pndm, dpmpp_2m"):
        make_sampler("k_euler", SD1_FILE, 10)
    for steps in (0, -1, 1001, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            make_sampler("ddim", SD1_FILE, steps)
    with pytest.raises(ValueError, match="solver_order"):
        make_sampler("unipc", {**SD1_FILE, "solver_order": 4}, 10)
    sp = make_sampler("euler", SD1_FILE, 10)
    for strength in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            sp.index_for_strength(strength)
    with pytest.raises(ValueError, match="no denoising step"):
        sp.index_for_strength(0.05)  # int(10 * 0.05) == 0
    with pytest.raises(ValueError, match="start"):
        sp.init_state(jnp.zeros(SHAPE), start=11)
    x = jnp.zeros(SHAPE)
    for name in ("euler_a", "ddpm"):
        sp = make_sampler(name, SD1_FILE, 10)
        with pytest.raises(ValueError, match="needs noise"):
            sp.step(sp.init_state(x), x, 0, x)


def test_index_for_strength_matches_the_img2img_pipeline():
    for name in ("ddim", "heun", "pndm"):
        for n in (1, 7, 25):
            sch = diffusers_scheduler(name, SD1_FILE, n)
            sp = make_sampler(name, SD1_FILE, n)
            for strength in (0.15, 0.5, 0.8, 0.99, 1.0):
                if int(n * strength) == 0:
                    continue
                fake_pipe = types.SimpleNamespace(scheduler=sch)
                timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(fake_pipe, n, strength, "cpu")
                assert sp.index_for_strength(strength) == len(sch.timesteps) - len(timesteps)


def test_names():
    assert set(DIFFUSERS_CLASS) == set(SAMPLERS) and len(SAMPLERS) == 10
    for name in SAMPLERS:
        assert hasattr(diffusers, DIFFUSERS_CLASS[name])
    assert make_sampler("euler_a", SD1_FILE, 3).needs_noise and make_sampler("ddpm", SD1_FILE, 3).needs_noise
    assert not any(make_sampler(n, SD1_FILE, 3).needs_noise for n in SAMPLERS if n not in ("euler_a", "ddpm"))
    assert make_sampler("heun", SD1_FILE, 5).num_calls == 9 and make_sampler("pndm", SD1_FILE, 5).num_calls == 6
