"""Diffusion samplers in pure JAX, step for step equal to diffusers' schedulers.

A `Sampler` is a set of float32 tables indexed by the UNet call index `i` (built once in numpy, following the
float32 arithmetic diffusers does in torch) plus a few static fields. Its methods are pure functions, so a whole
denoising loop is one `jax.lax.fori_loop` under `jax.jit`, with `i` traced:

    sampler = make_sampler("dpmpp_2m", scheduler_config_dict, num_inference_steps=25)
    x = noise * sampler.init_noise_sigma
    state = sampler.init_state(x)
    def body(i, carry):
        x, state = carry
        eps = unet(sampler.scale_model_input(x, i), sampler.timesteps[i], ...)
        return sampler.step(state, eps, i, x)
    x, _ = jax.lax.fori_loop(0, sampler.num_calls, body, (x, state))

`Sampler` is a registered pytree: the tables (`timesteps`, `tables`) are its leaves, everything else is static
metadata. Close over it in a jitted function (tables become constants) or pass it as an argument (tables become
inputs, so one compiled loop serves every config with the same name, step count and static fields). It compares and hashes by
identity.

Each name stands for one diffusers scheduler built with `XScheduler.from_config(config)` (see `DIFFUSERS_CLASS` and
`DIFFUSERS_OVERRIDES`): same timesteps, same `init_noise_sigma`, same `scale_model_input`, same `step` (with the
internal counters and history diffusers keeps), same `add_noise`. Starting mid-schedule follows diffusers' img2img
pipeline: `start = sampler.index_for_strength(strength)`, history empty at `start`.

Arrays are layout-agnostic (the maths is elementwise), e.g. latents `(B, H, W, C)`. The step arithmetic is float32
whatever the model dtype; `step` returns `x` in the dtype it was given.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SAMPLERS = ("ddim", "pndm", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "lms", "heun", "ddpm", "unipc")

DIFFUSERS_CLASS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "ddpm": "DDPMScheduler",
    "unipc": "UniPCMultistepScheduler",
}

# Constructor arguments that the sampler name fixes, whatever the config file says.
DIFFUSERS_OVERRIDES = {
    "pndm": {"skip_prk_steps": True},
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    "dpmpp_2m_karras": {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
}

_COMMON_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
    steps_offset=0,
)
# The constructor defaults of each diffusers class, for the keys that a config file may leave out. A key a class
# does not take stays None.
_CLASS_DEFAULTS = {
    "DDIMScheduler": dict(timestep_spacing="leading", set_alpha_to_one=True, clip_sample=True, clip_sample_range=1.0),
    "PNDMScheduler": dict(timestep_spacing="leading", set_alpha_to_one=False),
    "DDPMScheduler": dict(
        timestep_spacing="leading", clip_sample=True, clip_sample_range=1.0, variance_type="fixed_small"
    ),
    "EulerDiscreteScheduler": dict(timestep_spacing="linspace", use_karras_sigmas=False),
    "EulerAncestralDiscreteScheduler": dict(timestep_spacing="linspace"),
    "LMSDiscreteScheduler": dict(timestep_spacing="linspace", use_karras_sigmas=False),
    "HeunDiscreteScheduler": dict(
        beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace", use_karras_sigmas=False, clip_sample=False,
        clip_sample_range=1.0,
    ),
    "DPMSolverMultistepScheduler": dict(
        timestep_spacing="linspace", use_karras_sigmas=False, solver_type="midpoint", solver_order=2
    ),
    "UniPCMultistepScheduler": dict(
        timestep_spacing="linspace", use_karras_sigmas=False, solver_type="bh2", solver_order=2,
        lower_order_final=True, predict_x0=True, disable_corrector=(),
    ),
}
# Which config keys each class reads (its constructor arguments among SchedulerConfig's fields).
_CLASS_KEYS = {
    cls: frozenset(_COMMON_DEFAULTS) | {"trained_betas"} | frozenset(extra) for cls, extra in _CLASS_DEFAULTS.items()
}

# Config keys whose non-default values change diffusers' results in ways sdjax does not implement.
_UNSUPPORTED = {
    "thresholding": False, "rescale_betas_zero_snr": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "use_lu_lambdas": False, "use_flow_sigmas": False, "use_dynamic_shifting": False, "interpolation_type": "linear",
    "timestep_type": "discrete", "final_sigmas_type": "zero", "sigma_min": None, "sigma_max": None, "solver_p": None,
    "lambda_min_clipped": -math.inf, "shift_terminal": None,
}
_CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "variance_type": ("fixed_small", "fixed_large"),
    "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"),
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The parts of a diffusers `scheduler_config.json` that the samplers use.

    A field is None when the file does not set it: each diffusers class then uses its own constructor default
    (e.g. `timestep_spacing` is "leading" for DDIM but "linspace" for Euler), which `for_class` fills in.
    """

    num_train_timesteps: int | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str | None = None
    timestep_spacing: str | None = None
    steps_offset: int | None = None
    set_alpha_to_one: bool | None = None  # DDIM, PNDM
    clip_sample: bool | None = None  # DDIM, DDPM, Heun
    clip_sample_range: float | None = None
    variance_type: str | None = None  # DDPM
    use_karras_sigmas: bool | None = None  # Euler, LMS, Heun, UniPC (the dpmpp_2m names fix it)
    solver_order: int | None = None  # UniPC (dpmpp_2m is order 2 by name)
    solver_type: str | None = None  # DPM-Solver: midpoint/heun; UniPC: bh1/bh2
    lower_order_final: bool | None = None  # UniPC
    predict_x0: bool | None = None  # UniPC
    disable_corrector: tuple[int, ...] | None = None  # UniPC

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """Reads a diffusers scheduler config dict; unknown keys (`_class_name`, ...) are ignored."""
        # diffusers saves every constructor argument; `_use_default_values` lists the ones that were defaults and
        # must not leak into another class (from_config drops them the same way).
        defaulted = set(d.get("_use_default_values", ()))
        d = {k: v for k, v in d.items() if k not in defaulted and not k.startswith("_")}
        for key, ok in _UNSUPPORTED.items():
            if key in d and d[key] is not None and d[key] != ok:
                raise ValueError(f"scheduler config {key}={d[key]!r} is not supported (only {ok!r})")
        for key, choices in _CHOICES.items():
            if d.get(key) is not None and d[key] not in choices:
                raise ValueError(f"scheduler config {key}={d[key]!r} is not supported; expected one of {choices}")
        kw: dict[str, Any] = {}
        for name in (f.name for f in dataclasses.fields(cls)):
            value = d.get(name)
            if value is None:
                continue
            if name in ("trained_betas", "disable_corrector"):
                if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
                    raise ValueError(f"scheduler config {name} must be a list of numbers, got {value!r:.80}")
                value = tuple(float(v) if name == "trained_betas" else int(v) for v in value)
            elif name in ("num_train_timesteps", "steps_offset", "solver_order"):
                if not _is_number(value) or int(value) != value:
                    raise ValueError(f"scheduler config {name}={value!r} must be an integer")
                value = int(value)
            elif name in ("beta_start", "beta_end", "clip_sample_range"):
                if not _is_number(value):
                    raise ValueError(f"scheduler config {name}={value!r} must be a finite number")
                value = float(value)
            elif name in ("set_alpha_to_one", "clip_sample", "use_karras_sigmas", "lower_order_final", "predict_x0"):
                if not isinstance(value, bool):
                    raise ValueError(f"scheduler config {name}={value!r} must be true or false")
            elif not isinstance(value, str):  # the names of _CHOICES
                raise ValueError(f"scheduler config {name}={value!r} must be a string")
            kw[name] = value
        config = cls(**kw)
        if config.num_train_timesteps is not None and config.num_train_timesteps < 2:
            raise ValueError(f"scheduler config num_train_timesteps={config.num_train_timesteps} must be >= 2")
        if config.trained_betas is not None and len(config.trained_betas) != (config.num_train_timesteps or 1000):
            raise ValueError(
                f"scheduler config trained_betas has {len(config.trained_betas)} values, "
                f"num_train_timesteps is {config.num_train_timesteps or 1000}"
            )
        return config

    def for_class(self, class_name: str) -> SchedulerConfig:
        """This config as diffusers class `class_name` sees it: its keys only, its defaults for missing ones."""
        defaults = {**_COMMON_DEFAULTS, **_CLASS_DEFAULTS[class_name]}
        keys = _CLASS_KEYS[class_name]
        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values[f.name] = (defaults.get(f.name) if value is None else value) if f.name in keys else None
        return SchedulerConfig(**values)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def diffusers_config(name: str, config: Mapping[str, Any]) -> dict:
    """The scheduler_config dict that makes diffusers build the scheduler `name` stands for."""
    _check_name(name)
    overrides = DIFFUSERS_OVERRIDES.get(name, {})
    out = {**config, "_class_name": DIFFUSERS_CLASS[name], **overrides}
    if "_use_default_values" in out:
        out["_use_default_values"] = [k for k in out["_use_default_values"] if k not in overrides]
    return out


def _check_name(name: str) -> None:
    if name not in DIFFUSERS_CLASS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")


# ----------------------------------------------------------------------------------------------------------------
# Tables, in numpy. diffusers computes betas and alphas_cumprod in torch float32 and most per-step scalars as
# float32 0-d tensors; the same float32 operations here keep the two within an ulp or so of each other.

_F32 = np.float32


def _torch_linspace(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) as torch's CPU kernel computes it (float32 step, filled from
    both ends); torch's SIMD chunking can still move a few values by one ulp."""
    start32, end32 = _F32(start), _F32(end)
    if n == 1:
        return np.array([start32], _F32)
    step = (end32 - start32) / _F32(n - 1)
    idx = np.arange(n)
    head = start32 + step * idx.astype(_F32)
    tail = end32 - step * (n - 1 - idx).astype(_F32)
    return np.where(idx < n // 2, head, tail).astype(_F32)


def _betas(c: SchedulerConfig) -> np.ndarray:
    n = c.num_train_timesteps
    if c.trained_betas is not None:
        return np.asarray(c.trained_betas, _F32)
    if c.beta_schedule == "linear":
        return _torch_linspace(c.beta_start, c.beta_end, n)
    if c.beta_schedule == "scaled_linear":
        b = _torch_linspace(c.beta_start**0.5, c.beta_end**0.5, n)
        return b * b
    # squaredcos_cap_v2 (Nichol & Dhariwal), computed in float64 like diffusers' betas_for_alpha_bar.
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], _F32)


def alphas_cumprod(c: SchedulerConfig) -> np.ndarray:
    alphas = _F32(1.0) - _betas(c)
    # torch.cumprod on CPU accumulates float32 in double.
    return np.cumprod(alphas.astype(np.float64)).astype(_F32)


def _train_sigmas(ac: np.ndarray) -> np.ndarray:
    return np.sqrt((_F32(1.0) - ac) / ac)


def _timesteps(family: str, c: SchedulerConfig, n: int) -> np.ndarray:
    """The inference timesteps of each diffusers class (before Karras re-spacing)."""
    T, spacing, offset = c.num_train_timesteps, c.timestep_spacing, c.steps_offset
    if family == "discrete":  # DDIM, DDPM: integers
        if spacing == "linspace":
            return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        if spacing == "leading":
            return (np.arange(0, n) * (T // n))[::-1].astype(np.int64) + offset
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    if family == "sigma":  # Euler, Euler a, LMS, Heun: float32, linspace not rounded
        if spacing == "linspace":
            return np.linspace(0, T - 1, n, dtype=_F32)[::-1].copy()
        if spacing == "leading":
            return (np.arange(0, n) * (T // n)).round()[::-1].astype(_F32) + _F32(offset)
        return np.arange(T, 0, -T / n).round().astype(_F32) - _F32(1)
    if family == "multistep":  # DPM-Solver, UniPC: n+1 points, the last (t=0) dropped
        if spacing == "linspace":
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if spacing == "leading":
            return (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64) + offset
        return np.arange(T, 0, -T / n).round().astype(np.int64) - 1
    # PNDM with skip_prk_steps: ascending base grid, then the PLMS order (second-to-last step repeated first).
    if spacing == "linspace":
        base = np.linspace(0, T - 1, n).round().astype(np.int64)
    elif spacing == "leading":
        base = (np.arange(0, n) * (T // n)).round().astype(np.int64) + offset
    else:
        base = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1
    return np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].astype(np.int64)


def _karras(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log-sigma (float64 like diffusers)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _interp_sigmas(ts: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    return np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)


def _alpha_sigma(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """VP alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of VE sigmas (float32, inf at sigma 0)."""
    with np.errstate(divide="ignore"):
        alpha = _F32(1) / np.sqrt(sigmas * sigmas + _F32(1))
        sig = sigmas * alpha
        lam = np.log(alpha) - np.log(sig)
    return alpha, sig, lam


def _lms_coefficients(sigmas: np.ndarray, n: int) -> np.ndarray:
    """coef[k, j] = integral over [sigma_k, sigma_k+1] of the Lagrange basis polynomial of sigma_{k-j} on the nodes
    sigma_k .. sigma_{k-order+1}, order = min(k+1, 4). diffusers integrates numerically (scipy quad); the polynomial
    has degree <= 3, so a 4-point Gauss-Legendre rule is exact."""
    nodes, weights = np.polynomial.legendre.leggauss(4)
    s = sigmas.astype(np.float64)
    coef = np.zeros((n, 4), np.float64)
    for k in range(n):
        order = min(k + 1, 4)
        a, b = s[k], s[k + 1]
        tau = (b - a) / 2 * nodes + (a + b) / 2
        for j in range(order):
            basis = np.ones_like(tau)
            for m in range(order):
                if m != j:
                    basis *= (tau - s[k - m]) / (s[k - j] - s[k - m])
            coef[k, j] = (b - a) / 2 * np.sum(weights * basis)
    return coef.astype(_F32)


def _unipc_tables(lam, alpha, sig, n, p, predict_x0, bh1, corrector):
    """Coefficients of UniPC's predictor (corrector=False) or corrector at each step k and order o = 1..p.

    The predictor at step k goes from sigma_k to sigma_{k+1} using outputs at k, k-1, ...; the corrector at step k
    redoes the step sigma_{k-1} -> sigma_k with the new output at k. Returns (cx, cm, cb, rk, rho):
    x_t = cx*x - cm*m0 - cb*(sum_j rho[o-1, j]*D1_j + [corrector] rho[o-1, o-1]*(m_t - m0)), D1_j = (m_j - m0)/rk_j.
    """
    cx = np.zeros(n, _F32)
    cm = np.zeros(n, _F32)
    cb = np.zeros(n, _F32)
    rk = np.ones((n, max(p - 1, 1)), _F32)
    rho = np.zeros((n, p, p), _F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for k in range(n):
            t, s0 = (k, k - 1) if corrector else (k + 1, k)
            if s0 < 0:
                continue
            h = lam[t] - lam[s0]
            if predict_x0:
                cx[k] = sig[t] / sig[s0]
            else:
                cx[k] = alpha[t] / alpha[s0]
            hh = -h if predict_x0 else h
            h_phi_1 = np.expm1(hh)
            b_h = hh if bh1 else np.expm1(hh)
            scale = alpha[t] if predict_x0 else sig[t]
            cm[k] = scale * h_phi_1
            cb[k] = scale * b_h
            for j in range(1, p):
                if s0 - j >= 0:
                    rk[k, j - 1] = (lam[s0 - j] - lam[s0]) / h
            for o in range(1, p + 1):
                if s0 - (o - 1) < 0:
                    continue
                rks = np.array(list(rk[k, : o - 1]) + [1.0], _F32)
                h_phi_k = h_phi_1 / hh - _F32(1)
                factorial = 1
                R, b = [], []
                for i in range(1, o + 1):
                    R.append(rks ** (i - 1))
                    b.append(h_phi_k * _F32(factorial) / b_h)
                    factorial *= i + 1
                    h_phi_k = h_phi_k / hh - _F32(1 / factorial)
                R, b = np.array(R, np.float64), np.array(b, np.float64)
                if not (np.all(np.isfinite(R)) and np.all(np.isfinite(b))):
                    continue  # e.g. the final step (sigma 0) at an order diffusers never uses there
                try:
                    if corrector:
                        rho[k, o - 1, :o] = [0.5] if o == 1 else np.linalg.solve(R, b)
                    elif o >= 2:
                        rho[k, o - 1, : o - 1] = [0.5] if o == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
                except np.linalg.LinAlgError:
                    continue  # singular only where diffusers never uses that order
    return cx, cm, cb, rk, rho


# ----------------------------------------------------------------------------------------------------------------
# The sampler.


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """A diffusers scheduler as float32 tables plus pure step functions (see the module docstring).

    timesteps: (num_calls,) float32, the UNet timestep of each call (diffusers' `scheduler.timesteps`).
    tables: name -> per-call float32 table; private to the step functions.
    """

    name: str
    num_inference_steps: int
    num_calls: int
    order: int  # diffusers' scheduler.order: UNet calls per "step" (2 for Heun)
    init_noise_sigma: float
    needs_noise: bool  # step needs `noise` (euler_a, ddpm)
    prediction_type: str
    clip_sample_range: float | None  # clip the x0 prediction to +-range (None: no clipping)
    history: int  # model outputs kept between steps
    options: tuple  # sampler-specific static options, as (key, value) pairs
    timesteps: jax.Array
    tables: dict

    # -- public API ------------------------------------------------------------------------------------------

    def init_state(self, x: jax.Array, start: int | jax.Array = 0) -> dict:
        """Fixed-shape state for a loop whose first call has index `start` (may be traced).

        The state holds a step counter and, for multistep samplers, history buffers shaped like `x` (float32). As in
        diffusers' img2img, the history is empty at `start` whatever its value, so the state does not depend on it.
        """
        if (isinstance(start, (int, np.integer)) and isinstance(self.num_calls, (int, np.integer))
                and not 0 <= start <= self.num_calls):
            raise ValueError(f"start={start} is outside [0, {self.num_calls}] for {self.name}")
        shape = jnp.shape(x)
        zeros = lambda *lead: jnp.zeros(lead + shape, jnp.float32)
        state = {"n": jnp.zeros((), jnp.int32)}
        if self.name == "pndm":
            state.update(ets=zeros(3), cur_sample=zeros())
        elif self.name == "lms":
            state.update(derivatives=zeros(4))
        elif self.name == "heun":
            state.update(prev_derivative=zeros(), dt=jnp.zeros((), jnp.float32), sample=zeros())
        elif self.name in ("dpmpp_2m", "dpmpp_2m_karras"):
            state.update(outputs=zeros(2))
        elif self.name == "unipc":
            state.update(outputs=zeros(self.history), last_sample=zeros())
        return state

    def scale_model_input(self, x: jax.Array, i: int | jax.Array) -> jax.Array:
        """The UNet input for call `i`: x / sqrt(sigma_i^2 + 1) for the sigma-space samplers, else x."""
        if "input_scale" not in self.tables:
            return x
        return _div(x.astype(jnp.float32), self.tables["input_scale"][i]).astype(x.dtype)

    def step(self, state: dict, model_output: jax.Array, i: int | jax.Array, x: jax.Array, noise=None):
        """One `scheduler.step(model_output, timesteps[i], x)`; returns (x_next, state).

        noise: standard normal array shaped like x, required by the stochastic samplers (`needs_noise`), ignored
        by the others.
        """
        if self.needs_noise:
            if noise is None:
                raise ValueError(f"sampler {self.name} is stochastic: step() needs noise shaped like x")
            noise = noise.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        x_next, state = _STEPS[self.name](self, state, out, i, x32, noise)
        state = {**state, "n": state["n"] + 1}
        return x_next.astype(x.dtype), state

    def add_noise(self, x0: jax.Array, noise: jax.Array, i: int | jax.Array) -> jax.Array:
        """x0 noised to the level of call `i`: diffusers' add_noise(x0, noise, timesteps[i:i+1]) after
        set_begin_index(i), as the img2img and inpaint pipelines use it."""
        a, b = self.tables["noise_scale_x0"][i], self.tables["noise_scale_noise"][i]
        x0_, n_ = x0.astype(jnp.float32), noise.astype(jnp.float32)
        out = x0_ + n_ * b if "input_scale" in self.tables else a * x0_ + b * n_
        return out.astype(x0.dtype)

    def index_for_strength(self, strength: float) -> int:
        """First call index of diffusers' img2img for `strength` in (0, 1]: t_start * order."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        n = self.num_inference_steps
        init_timestep = min(int(n * strength), n)
        if init_timestep == 0:
            raise ValueError(f"strength {strength} leaves no denoising step out of {n}; use strength >= {1 / n:g}")
        return max(n - init_timestep, 0) * self.order

    def padded(self, length: int) -> "Sampler":
        """The same sampler with its tables (and timesteps) padded to `length` calls by repeating the last row, and
        its counts as arrays: passed to a jitted program as an argument, every step count whose calls fit in
        `length` runs the same compiled program (the padding is never read: the loop stops at num_calls)."""
        if length < self.num_calls:
            raise ValueError(f"cannot pad {self.num_calls} calls to {length}")

        def pad(a):  # on the host: no device op (and no compile) per table length
            a = np.asarray(a)
            return np.concatenate([a, np.repeat(a[-1:], length - a.shape[0], axis=0)]) if length > a.shape[0] else a

        return dataclasses.replace(
            self, timesteps=pad(self.timesteps), tables={k: pad(v) for k, v in self.tables.items()},
            num_inference_steps=np.int32(self.num_inference_steps), num_calls=np.int32(self.num_calls),
            init_noise_sigma=np.float32(self.init_noise_sigma))

    # -- helpers -----------------------------------------------------------------------------------------------

    def _clip(self, x0):
        if self.clip_sample_range is None:
            return x0
        return jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)

    def _option(self, key):
        return dict(self.options)[key]


# The counts are data: a program that takes a (padded) sampler as an argument does not depend on the step count.
jax.tree_util.register_dataclass(
    Sampler,
    data_fields=["timesteps", "tables", "num_inference_steps", "num_calls", "init_noise_sigma"],
    meta_fields=["name", "order", "needs_noise", "prediction_type", "clip_sample_range", "history", "options"],
)


def calls_bucket(num_calls: int) -> int:
    """The padded table length for `num_calls` sampler calls: the next power of two from 8 (one compiled program
    serves every step count of a bucket)."""
    length = 8
    while length < num_calls:
        length *= 2
    return length


# ----------------------------------------------------------------------------------------------------------------
# Step functions: (sampler, state, model_output f32, i, x f32, noise) -> (x_next f32, state). `state["n"]` counts the
# steps taken since the start (diffusers' counter / lower_order_nums); Sampler.step increments it.


def _div(a, s):
    """a / s for a per-step scalar s, as a true division.

    XLA rewrites a / broadcast(s) into a * broadcast(1 / s), which differs from diffusers' division by up to an ulp;
    materializing the broadcast behind an optimization barrier keeps the division (the arrays are latent-sized, so
    the cost is nil next to a UNet call)."""
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(s, jnp.shape(a)))


def _step_ddim(s, state, out, i, x, noise):
    t = s.tables
    sa, sb = t["sqrt_alpha"][i], t["sqrt_beta"][i]
    if s.prediction_type == "epsilon":
        x0, eps = _div(x - sb * out, sa), out
    else:
        x0, eps = sa * x - sb * out, sa * out + sb * x
    x0 = s._clip(x0)
    return t["sqrt_alpha_prev"][i] * x0 + t["direction"][i] * eps, state


def _step_ddpm(s, state, out, i, x, noise):
    t = s.tables
    sa, sb = t["sqrt_alpha"][i], t["sqrt_beta"][i]
    x0 = _div(x - sb * out, sa) if s.prediction_type == "epsilon" else sa * x - sb * out
    x0 = s._clip(x0)
    prev = t["coef_x0"][i] * x0 + t["coef_x"][i] * x
    # std is 0 at t == 0, where diffusers adds no noise.
    return prev + t["std"][i] * noise, state


def _step_pndm(s, state, out, i, x, noise):
    t, n, ets = s.tables, state["n"], state["ets"]  # ets: previous model outputs, newest first
    # PLMS: the first step is Euler, the second redoes it from the same sample with the average of both outputs
    # (Heun-like), then Adams-Bashforth of growing order.
    combos = [
        out,
        (out + ets[0]) / 2,
        (3 * out - ets[0]) / 2,
        (23 * out - 16 * ets[0] + 5 * ets[1]) / 12,
        jnp.float32(1 / 24) * (55 * out - 59 * ets[0] + 37 * ets[1] - 9 * ets[2]),
    ]
    mo = jnp.select([n == k for k in range(4)], combos[:4], combos[4])
    second = n == 1  # diffusers: the second call steps t+ratio -> t from the first call's sample
    sample = jnp.where(second, state["cur_sample"], x)
    pick = lambda name: jnp.where(second, t[name + "_2"][i], t[name][i])
    if s.prediction_type == "v_prediction":
        mo = pick("sqrt_alpha") * mo + pick("sqrt_beta") * sample
    prev = pick("sample_coeff") * sample - _div(pick("alpha_diff") * mo, pick("denom"))
    ets = jnp.where(second, ets, jnp.concatenate([out[None], ets[:-1]]))
    cur_sample = jnp.where(n == 0, x, state["cur_sample"])
    return prev, {**state, "ets": ets, "cur_sample": cur_sample}


def _x0_ve(s, out, x, i):
    """x0 prediction of the sigma-space (k-diffusion) samplers at sigma_i."""
    t = s.tables
    if s.prediction_type == "epsilon":
        return x - t["sigma"][i] * out
    return out * t["c_out"][i] + _div(x, t["c_skip_div"][i])


def _step_euler(s, state, out, i, x, noise):
    t = s.tables
    derivative = _div(x - _x0_ve(s, out, x, i), t["sigma"][i])
    return x + derivative * t["dt"][i], state


def _step_euler_a(s, state, out, i, x, noise):
    t = s.tables
    derivative = _div(x - _x0_ve(s, out, x, i), t["sigma"][i])
    prev = x + derivative * t["dt"][i]
    return prev + noise * t["sigma_up"][i], state


def _step_lms(s, state, out, i, x, noise):
    t, n = s.tables, state["n"]
    derivative = _div(x - _x0_ve(s, out, x, i), t["sigma"][i])
    hist = jnp.concatenate([derivative[None], state["derivatives"][:-1]])
    # diffusers keeps at most 4 derivatives, and only those taken since the start; the coefficients come from
    # order min(i+1, 4) regardless, exactly as there.
    have = jnp.minimum(n + 1, 4)
    coef = t["lms_coef"][i]
    update = coef[0] * hist[0]
    for j in range(1, 4):
        update = update + jnp.where(j < have, coef[j] * hist[j], 0.0)
    return x + update, {**state, "derivatives": hist}


def _step_heun(s, state, out, i, x, noise):
    t = s.tables
    first = state["n"] % 2 == 0  # diffusers: state_in_first_order; calls alternate from the start
    x0 = s._clip(_x0_ve(s, out, x, i))
    # Both halves evaluate the model at sigma_i: the Euler half at its start, the correction at its end.
    derivative = _div(x - x0, t["sigma"][i])
    averaged = (state["prev_derivative"] + derivative) / 2
    prev = jnp.where(first, x + derivative * t["dt"][i], state["sample"] + averaged * state["dt"])
    new = {
        "prev_derivative": jnp.where(first, derivative, state["prev_derivative"]),
        "dt": jnp.where(first, t["dt"][i], state["dt"]),
        "sample": jnp.where(first, x, state["sample"]),
    }
    return prev, {**state, **new}


def _convert_vp(s, out, x, i):
    """The data prediction x0 (or UniPC's noise prediction when predict_x0=False) from the model output."""
    t = s.tables
    a, sg = t["alpha"][i], t["sig"][i]
    if s.options and not s._option("predict_x0"):
        return out if s.prediction_type == "epsilon" else a * out + sg * x
    return _div(x - sg * out, a) if s.prediction_type == "epsilon" else a * x - sg * out


def _step_dpmpp_2m(s, state, out, i, x, noise):
    t, n = s.tables, state["n"]
    m0 = _convert_vp(s, out, x, i)
    m1 = state["outputs"][0]
    first_order = t["c_x"][i] * x - t["c_1"][i] * m0
    d1 = t["inv_r0"][i] * (m0 - m1)
    second_order = t["c_x"][i] * x - t["c_1"][i] * m0 - t["c_2"][i] * d1
    # First order at the first step since the start (no history) and at the last step (final sigma 0).
    use_first = (n == 0) | (i == s.num_calls - 1)
    prev = jnp.where(use_first, first_order, second_order)
    return prev, {**state, "outputs": jnp.stack([m0, m1])}


def _unipc_update(t, prefix, i, x, m0, history, order, p, m_t=None):
    """UniPC predictor (m_t None) or corrector update; history[j-1] is the output j steps before m0."""
    rk, rho = t[prefix + "rk"][i], t[prefix + "rho"][i][order - 1]
    res = jnp.zeros_like(x)
    for j in range(1, p):
        d1 = _div(history[j - 1] - m0, rk[j - 1])
        res = res + jnp.where(j < order, rho[j - 1] * d1, 0.0)
    if m_t is not None:
        res = res + rho[order - 1] * (m_t - m0)
    return t[prefix + "cx"][i] * x - t[prefix + "cm"][i] * m0 - t[prefix + "cb"][i] * res


def _step_unipc(s, state, out, i, x, noise):
    t, n, p = s.tables, state["n"], s.history
    outputs = state["outputs"]  # converted outputs of previous steps, newest first
    m = _convert_vp(s, out, x, i)

    def order_at(k, done):  # diffusers' this_order at step k after `done` steps since the start
        return jnp.minimum(t["max_order"][k], jnp.minimum(done, p) + 1)

    # Corrector: refine the previous predictor step now that the model output at its end is known.
    previous_order = order_at(jnp.maximum(i - 1, 0), jnp.maximum(n - 1, 0))
    corrected = _unipc_update(t, "c_", i, state["last_sample"], outputs[0], outputs[1:], previous_order, p, m_t=m)
    x = jnp.where((n >= 1) & t["use_corrector"][i], corrected, x)
    outputs = jnp.concatenate([m[None], outputs[:-1]])
    prev = _unipc_update(t, "p_", i, x, m, outputs[1:], order_at(i, n), p)
    return prev, {**state, "outputs": outputs, "last_sample": x}


_STEPS = {
    "ddim": _step_ddim,
    "pndm": _step_pndm,
    "dpmpp_2m": _step_dpmpp_2m,
    "dpmpp_2m_karras": _step_dpmpp_2m,
    "euler": _step_euler,
    "euler_a": _step_euler_a,
    "lms": _step_lms,
    "heun": _step_heun,
    "ddpm": _step_ddpm,
    "unipc": _step_unipc,
}


# ----------------------------------------------------------------------------------------------------------------
# Construction.


def make_sampler(name: str, config: SchedulerConfig | Mapping[str, Any], num_inference_steps: int) -> Sampler:
    """The sampler `name` (one of SAMPLERS) for a scheduler config and a number of inference steps.

    config: a SchedulerConfig or a diffusers scheduler_config dict. Raises ValueError for an unknown name, a
    step count outside [1, num_train_timesteps] or an unsupported config value.
    """
    _check_name(name)
    if not isinstance(config, SchedulerConfig):
        config = SchedulerConfig.from_dict(config)
    c = config.for_class(DIFFUSERS_CLASS[name])
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= c.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be an integer in [1, {c.num_train_timesteps}], got {n!r}")
    n = int(n)
    ac = alphas_cumprod(c)
    build = {
        "ddim": _build_ddim, "pndm": _build_pndm, "ddpm": _build_ddpm, "euler": _build_sigma, "euler_a": _build_sigma,
        "lms": _build_sigma, "heun": _build_sigma, "dpmpp_2m": _build_dpm, "dpmpp_2m_karras": _build_dpm,
        "unipc": _build_unipc,
    }[name]
    fields = build(name, c, n, ac)
    timesteps = np.asarray(fields.pop("timesteps"), _F32)
    tables = {k: jnp.asarray(v) for k, v in fields.pop("tables").items()}
    return Sampler(
        name=name,
        num_inference_steps=n,
        num_calls=len(timesteps),
        order=2 if name == "heun" else 1,
        init_noise_sigma=fields.get("init_noise_sigma", 1.0),
        needs_noise=name in ("euler_a", "ddpm"),
        prediction_type=c.prediction_type,
        clip_sample_range=c.clip_sample_range if c.clip_sample else None,
        history=fields.get("history", 0),
        options=fields.get("options", ()),
        timesteps=jnp.asarray(timesteps),
        tables=tables,
    )


def _alpha_noise_tables(ac, ts):
    a = ac[ts]
    return {"noise_scale_x0": np.sqrt(a), "noise_scale_noise": np.sqrt(_F32(1) - a)}


def _build_ddim(name, c, n, ac):
    ts = _timesteps("discrete", c, n)
    prev = ts - c.num_train_timesteps // n
    final = _F32(1.0) if c.set_alpha_to_one else ac[0]
    a = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(_F32)
    tables = {
        "sqrt_alpha": np.sqrt(a), "sqrt_beta": np.sqrt(_F32(1) - a), "sqrt_alpha_prev": np.sqrt(a_prev),
        "direction": np.sqrt(_F32(1) - a_prev),  # eta = 0: no variance term
        **_alpha_noise_tables(ac, ts),
    }
    return {"timesteps": ts, "tables": tables}


def _build_ddpm(name, c, n, ac):
    ts = _timesteps("discrete", c, n)
    prev = np.append(ts[1:], -1)
    a = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], _F32(1.0)).astype(_F32)
    b, b_prev = _F32(1) - a, _F32(1) - a_prev
    cur_alpha = a / a_prev
    cur_beta = _F32(1) - cur_alpha
    if c.variance_type == "fixed_small":
        var = np.maximum(b_prev / b * cur_beta, _F32(1e-20))
    else:
        var = cur_beta
    tables = {
        "sqrt_alpha": np.sqrt(a), "sqrt_beta": np.sqrt(b), "coef_x0": np.sqrt(a_prev) * cur_beta / b,
        "coef_x": np.sqrt(cur_alpha) * b_prev / b, "std": np.where(ts > 0, np.sqrt(var), _F32(0)).astype(_F32),
        **_alpha_noise_tables(ac, ts),
    }
    return {"timesteps": ts, "tables": tables}


def _pndm_coefficients(ac, t, t_prev, final):
    t = np.clip(t, 0, len(ac) - 1)  # only out of range where diffusers would fail indexing
    a = ac[t]
    a_prev = np.where(t_prev >= 0, ac[np.clip(t_prev, 0, len(ac) - 1)], final).astype(_F32)
    b, b_prev = _F32(1) - a, _F32(1) - a_prev
    return {
        "sqrt_alpha": np.sqrt(a), "sqrt_beta": np.sqrt(b), "sample_coeff": np.sqrt(a_prev / a),
        "alpha_diff": a_prev - a, "denom": a * np.sqrt(b_prev) + np.sqrt(a * b * a_prev),
    }


def _build_pndm(name, c, n, ac):
    ts = _timesteps("pndm", c, n)
    ratio = c.num_train_timesteps // n
    final = _F32(1.0) if c.set_alpha_to_one else ac[0]
    tables = _pndm_coefficients(ac, ts, ts - ratio, final)
    # The second PLMS call (counter 1) steps from t + ratio to t instead.
    tables.update({k + "_2": v for k, v in _pndm_coefficients(ac, ts + ratio, ts, final).items()})
    tables.update(_alpha_noise_tables(ac, ts))
    return {"timesteps": ts, "tables": tables}


def _build_sigma(name, c, n, ac):
    """Euler, Euler ancestral, LMS and Heun: k-diffusion samplers on sigma = sqrt((1 - a) / a)."""
    ts = _timesteps("sigma", c, n)
    train = _train_sigmas(ac)
    sig = _interp_sigmas(ts, train)
    if c.use_karras_sigmas:  # Euler, LMS, Heun: Karras spacing between the end points of the schedule above
        sig = _karras(sig[-1].item(), sig[0].item(), n)
        ts = _sigma_to_t(sig, np.log(train))
    sig = np.append(sig, 0.0).astype(_F32)
    ts = ts.astype(_F32)
    if name == "heun":  # every sigma after the first is visited twice (Euler step, then correction)
        sig = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])
        ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
    init_sigma = sig.max()
    if c.timestep_spacing == "leading":
        init_sigma = np.sqrt(init_sigma * init_sigma + _F32(1))
    s, s_next = sig[:-1], sig[1:]
    tables = {
        "sigma": sig, "input_scale": np.sqrt(sig * sig + _F32(1)), "c_out": -sig / np.sqrt(sig * sig + _F32(1)),
        "c_skip_div": sig * sig + _F32(1), "dt": s_next - s, "noise_scale_x0": np.ones_like(sig),
        "noise_scale_noise": sig,
    }
    if name == "euler_a":
        up = np.sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s))
        down = np.sqrt(s_next * s_next - up * up)
        tables.update(sigma_up=up, dt=down - s)
    if name == "lms":
        tables["lms_coef"] = _lms_coefficients(sig, n)
    return {"timesteps": ts, "tables": tables, "init_noise_sigma": float(init_sigma)}


def _vp_sigmas(name, c, n, ac, karras):
    """Inference sigmas (n+1, last 0) and timesteps of DPM-Solver and UniPC."""
    ts = _timesteps("multistep", c, n)
    train = _train_sigmas(ac)
    if karras:
        sig = _karras(train[0].item(), train[-1].item(), n)
        ts = _sigma_to_t(sig, np.log(train))
        # DPM-Solver does not round for squaredcos_cap_v2 (the int64 cast then truncates); UniPC always rounds.
        if name == "unipc" or c.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
    else:
        sig = _interp_sigmas(ts, train)
    return ts.astype(np.int64), np.append(sig, 0.0).astype(_F32)


def _build_dpm(name, c, n, ac):
    ts, sig = _vp_sigmas(name, c, n, ac, karras=name == "dpmpp_2m_karras")
    alpha, sg, lam = _alpha_sigma(sig)
    k = np.arange(n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        h = lam[k + 1] - lam[k]
        phi = alpha[k + 1] * (np.exp(-h) - _F32(1))
        h_0 = np.concatenate([[_F32(1)], lam[k[1:]] - lam[k[1:] - 1]]).astype(_F32)  # unused at k = 0
        r0 = h_0 / h
        if c.solver_type == "heun":
            c_2 = -(alpha[k + 1] * ((np.exp(-h) - _F32(1)) / h + _F32(1)))
        else:
            c_2 = _F32(0.5) * phi
        tables = {
            "alpha": alpha, "sig": sg, "c_x": sg[k + 1] / sg[k], "c_1": phi, "c_2": c_2.astype(_F32),
            "inv_r0": (_F32(1.0) / r0).astype(_F32), "noise_scale_x0": alpha, "noise_scale_noise": sg,
        }
    return {"timesteps": ts, "tables": tables, "history": 2}


def _build_unipc(name, c, n, ac):
    p = c.solver_order
    if not 1 <= p <= 3:
        raise ValueError(f"UniPC solver_order={p} is not supported (1, 2 or 3)")
    ts, sig = _vp_sigmas(name, c, n, ac, karras=c.use_karras_sigmas)
    alpha, sg, lam = _alpha_sigma(sig)
    bh1 = c.solver_type == "bh1"
    tables = {"alpha": alpha, "sig": sg, "noise_scale_x0": alpha, "noise_scale_noise": sg}
    for prefix, corrector in (("p_", False), ("c_", True)):
        cx, cm, cb, rk, rho = _unipc_tables(lam, alpha, sg, n, p, c.predict_x0, bh1, corrector)
        tables.update({prefix + "cx": cx, prefix + "cm": cm, prefix + "cb": cb, prefix + "rk": rk, prefix + "rho": rho})
    k = np.arange(n)
    tables["max_order"] = (np.minimum(p, n - k) if c.lower_order_final else np.full(n, p)).astype(np.int32)
    tables["use_corrector"] = np.array([(j - 1) not in c.disable_corrector for j in k])
    return {"timesteps": ts, "tables": tables, "history": p, "options": (("predict_x0", c.predict_x0),)}
