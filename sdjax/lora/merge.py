"""Loaded adapters and the merged weights they give: W + sum_i(weight_i * scale_i * delta_i), computed on the devices
by one jitted update per set of active adapters and written into the networks with `nnx.update`.

The generation program takes the networks' weights as arguments, so a new merge (load, `set_adapters`, unload)
never recompiles it: the merged arrays keep the base weights' shapes, dtypes and shardings. The original arrays of
the weights an adapter touches are kept (only those), and unloading writes them back: the base weights return
bit-exactly.

Fusing (diffusers' `fuse_lora`) makes adapters part of the base: the fused weights replace the base arrays the merge
adds to (the originals are kept until `unfuse`), so unloading afterwards keeps the fused effect, as in diffusers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.loading import CONV
from sdjax.lora.formats import COMPONENTS, AdapterFile, Factors, LoHa, LoKr, LoRA
from sdjax.lora.targets import Target, Targets, is_abstract

MERGE_PROGRAMS = 4  # compiled merges kept (one per set of active adapters and the weights they touch)


# -- the deltas ------------------------------------------------------------------------------------------------------


def _flat(a, rows: int):
    return a.reshape(rows, -1)


def delta(f: Factors) -> jax.Array:
    """The factors' product, float32, PyTorch layout: (out, in) or (out, in, kh, kw) (LoHa without Tucker cores and
    LoRA of a conv written as a linear give (out, in * kh * kw): the caller reshapes to the weight's shape)."""
    if isinstance(f, LoRA):
        up = _flat(f.up, f.up.shape[0])
        if f.mid is None:
            return (up @ _flat(f.down, f.rank)).reshape(f.shape())
        down = _flat(f.down, f.rank)
        return jnp.einsum("mn...,im,nj->ij...", f.mid, up, down)
    if isinstance(f, LoHa):
        if f.t1 is not None:
            first = jnp.einsum("ij...,jr,ip->pr...", f.t1, f.w1b, f.w1a)
            second = jnp.einsum("ij...,jr,ip->pr...", f.t2, f.w2b, f.w2a)
            return first * second
        return (f.w1a @ _flat(f.w1b, f.rank)) * (_flat(f.w2a, f.w2a.shape[0]) @ _flat(f.w2b, f.w2b.shape[0]))
    if isinstance(f, LoKr):
        w1 = f.w1 if f.w1 is not None else f.w1a @ f.w1b
        if f.w2 is not None:
            w2 = f.w2
        elif f.t2 is not None:
            w2 = jnp.einsum("ij...,ip,jr->pr...", f.t2, f.w2a, f.w2b)
        else:
            w2 = (f.w2a @ _flat(f.w2b, f.w2b.shape[0])).reshape(f.w2a.shape[0], *f.w2b.shape[1:])
        w1 = w1.reshape(*w1.shape, *(1,) * (w2.ndim - w1.ndim))
        return jnp.kron(w1, w2)
    raise TypeError(f"unknown adapter factors {type(f).__name__}")


def to_kernel(d: jax.Array, target: Target) -> jax.Array:
    """A PyTorch-layout delta as the flax kernel of `target` (Conv: (kh, kw, in, out), Linear: (in, out))."""
    d = d.reshape(target.shape)
    return d.transpose(2, 3, 1, 0) if target.transform == CONV else d.T


@dataclasses.dataclass(frozen=True)
class Step:
    """One weight of a merge (static: part of the merge program's cache key): its target and the positions of the
    active adapters that change it."""

    target: Target
    users: tuple[int, ...]


def _merge(steps: tuple[Step, ...], base: dict, patches: tuple[dict, ...], weights: tuple[dict, ...]) -> dict:
    out = {}
    for step in steps:
        key, component = step.target.key, step.target.component
        w = base[key]
        acc = w.astype(jnp.float32)
        for i in step.users:
            factors, scale = patches[i][key]
            acc = acc + (weights[i][component] * scale) * to_kernel(delta(factors), step.target)
        out[key] = acc.astype(w.dtype)
    return out


# -- the adapters of one pipeline ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Loaded:
    """One loaded adapter: its patches on the devices (key -> (factors, scale)) and their targets."""

    name: str
    targets: dict[str, Target]
    patches: dict[str, tuple]
    source: str
    kinds: dict


class Adapters:
    """The adapters loaded into a pipeline's networks (`networks`: component -> module), which are active with
    which weights, and the base weights of the layers they touch."""

    def __init__(self, networks: Mapping[str, nnx.Module], targets: Targets):
        self.networks = dict(networks)
        self.targets = targets
        self.loaded: dict[str, Loaded] = {}
        self.active: list[tuple[str, dict[str, float]]] = []  # (name, component -> weight), in order
        self.base: dict[str, jax.Array] = {}  # key -> the original array of every weight an adapter touches
        self.base_targets: dict[str, Target] = {}  # key -> where that weight lives
        self.enabled = True
        self.fused: set[tuple[str, str]] = set()  # (adapter, component) pairs in the base weights
        self.unfused: dict[str, jax.Array] = {}  # key -> the array before the first fuse changed it
        self._programs: dict = {}

    # -- loading ---------------------------------------------------------------------------------------------------

    def load(self, adapter: AdapterFile, name: str | None = None) -> str:
        """Load `adapter` under `name` (default "default_<n>", as diffusers) and make it the one active adapter with
        weight 1 (diffusers' behaviour); returns the name."""
        if name is None:
            n = len(self.loaded)
            while f"default_{n}" in self.loaded:
                n += 1
            name = f"default_{n}"
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
        if name in self.loaded:
            raise ValueError(f"an adapter named {name!r} is already loaded (loaded: {', '.join(self.loaded)}); "
                             "give another adapter_name or delete_adapters it first")
        for component, module in self.networks.items():
            if is_abstract(module):
                raise ValueError(f"the pipeline's {component} has shapes only (no weights): LoRA needs real weights")
        pairs = self.targets.resolve(adapter)
        flat = {c: dict(nnx.to_flat_state(nnx.state(m, nnx.Param))) for c, m in self.networks.items()}
        targets, patches = {}, {}
        for target, patch in pairs:
            current = flat[target.component][target.path].get_value()
            if target.key not in self.base:
                self.base[target.key] = current
                self.base_targets[target.key] = target
            put = lambda a, s=current.sharding: jax.device_put(a, s)  # noqa: E731
            targets[target.key] = target
            patches[target.key] = (jax.tree.map(put, patch.factors), put(np.float32(patch.scale)))
        self.loaded[name] = Loaded(name, targets, patches, adapter.source, adapter.kinds())
        self.active = [(name, dict.fromkeys(COMPONENTS, 1.0))]
        self.apply()
        return name

    def set_active(self, names: Sequence[str], weights: Sequence) -> None:
        """Activate `names` (in order) with `weights`: one per name, each a number or {component: number} (a missing
        component keeps weight 1)."""
        unknown = [n for n in names if n not in self.loaded]
        if unknown:
            raise ValueError(f"adapter(s) {', '.join(map(repr, unknown))} not loaded (loaded: "
                             f"{', '.join(self.loaded) or 'none'})")
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names repeat: {list(names)}")
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} adapter_weights")
        self.active = [(n, _weights(w, n)) for n, w in zip(names, weights)]
        self.apply()

    def delete(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.loaded]
        if unknown:
            raise ValueError(f"adapter(s) {', '.join(map(repr, unknown))} not loaded")
        for n in names:
            del self.loaded[n]
        self.active = [(n, w) for n, w in self.active if n not in names]
        self._forget_unused()
        self.apply()

    def unload(self) -> None:
        """Every touched weight back to its base array (the original, or the fused one after `fuse`); no adapter
        left."""
        self._write(self.base)
        self.loaded.clear()
        self.active = []
        self.base, self.base_targets = {}, {}
        self.fused, self.unfused = set(), {}
        self._programs.clear()

    def fuse(self, names: Sequence[str] | None, components: Sequence[str] | None, scale: float, safe: bool) -> None:
        """Add `scale` x the deltas of adapters `names` (default: the active ones, with their weights; an inactive
        one with weight 1) in `components` (default: every network) to the base weights. `safe`: refuse, changing
        nothing, if a fused weight is not finite."""
        components = list(self.networks) if components is None else list(components)
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.number)) or not math.isfinite(scale):
            raise ValueError(f"lora_scale must be a finite number, got {scale!r}")
        bad = [c for c in components if c not in self.networks]
        if bad:
            raise ValueError(f"components: {', '.join(map(repr, bad))} not in this pipeline (adapters change "
                             f"{', '.join(self.networks)})")
        weights = dict(self.active) if self.enabled else {}
        if names is None:
            names = list(weights)
            if not names:
                raise ValueError("no active adapter to fuse: load one, or name them with adapter_names")
        else:
            names = [names] if isinstance(names, str) else list(names)
            unknown = [n for n in names if n not in self.loaded]
            if unknown:
                raise ValueError(f"adapter(s) {', '.join(map(repr, unknown))} not loaded (loaded: "
                                 f"{', '.join(self.loaded) or 'none'})")
        fusing = [(self.loaded[n], {c: weights.get(n, {}).get(c, 1.0) * scale if c in components and
                                    (n, c) not in self.fused else 0.0 for c in COMPONENTS}) for n in names]
        fused = self._merged(fusing)
        if safe:
            broken = sorted(k for k, v in fused.items() if not bool(jnp.isfinite(v).all()))
            if broken:
                raise ValueError(f"fusing gives non-finite weights in {len(broken)} layer(s), e.g. {broken[0]}; "
                                 "nothing was fused")
        for key, value in fused.items():
            self.unfused.setdefault(key, self.base[key])
            self.base[key] = value
        self.fused |= {(a.name, c) for a, w in fusing for c, v in w.items() if v != 0.0}
        self.apply()

    def unfuse(self, components: Sequence[str] | None = None) -> None:
        """The weights of `components` (default: every network) back to their state before `fuse` (the adapters
        still loaded are merged again as they are active)."""
        components = list(self.networks) if components is None else list(components)
        for key in [k for k in self.unfused if self.base_targets[k].component in components]:
            self.base[key] = self.unfused.pop(key)
        self.fused = {(n, c) for n, c in self.fused if c not in components}
        self._forget_unused()
        self.apply()

    def _forget_unused(self) -> None:
        """Write back and stop keeping the base of every weight no loaded adapter touches and no fuse changed."""
        keep = {k for a in self.loaded.values() for k in a.targets} | set(self.unfused)
        self._write({k: v for k, v in self.base.items() if k not in keep})
        self.base = {k: v for k, v in self.base.items() if k in keep}
        self.base_targets = {k: v for k, v in self.base_targets.items() if k in keep}

    def set_enabled(self, on: bool) -> None:
        self.enabled = bool(on)
        self.apply()

    # -- merging ---------------------------------------------------------------------------------------------------

    def apply(self) -> None:
        """Write W + sum(weight * scale * delta) of the active adapters into every touched weight (the base array
        where no active adapter changes it)."""
        active = [(self.loaded[n], {c: 0.0 if (n, c) in self.fused else v for c, v in w.items()})
                  for n, w in self.active] if self.enabled else []
        merged = self._merged(active)
        self._write({**{k: v for k, v in self.base.items() if k not in merged}, **merged})

    def _merged(self, active: Sequence[tuple[Loaded, dict[str, float]]]) -> dict[str, jax.Array]:
        """key -> base + sum(weight * scale * delta) of `active` for every base weight they change (weight 0: no
        change)."""
        steps = tuple(Step(self.base_targets[key], users) for key in self.base
                      if (users := tuple(i for i, (a, w) in enumerate(active)
                                         if key in a.targets and w[a.targets[key].component] != 0.0)))
        if not steps:
            return {}
        program = self._programs.get(steps)
        if program is None:
            shardings = {s.target.key: self.base[s.target.key].sharding for s in steps}
            program = jax.jit(lambda *a: _merge(steps, *a), out_shardings=shardings)
            if len(self._programs) >= MERGE_PROGRAMS:  # keep the last few: switching back and forth compiles once
                self._programs.pop(next(iter(self._programs)))
            self._programs[steps] = program
        base = {s.target.key: self.base[s.target.key] for s in steps}
        patches = tuple({k: a.patches[k] for k in a.targets if k in base} for a, _ in active)
        weights = tuple({c: np.float32(v) for c, v in w.items()} for _, w in active)
        return program(base, patches, weights)

    def _write(self, values: Mapping[str, jax.Array]) -> None:
        by_component: dict[str, dict] = {}
        for key, value in values.items():
            target = self.base_targets[key]
            by_component.setdefault(target.component, {})[target.path] = value
        for component, new in by_component.items():
            module = self.networks[component]
            flat = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
            for path, value in new.items():
                flat[path].set_value(value)
            nnx.update(module, nnx.from_flat_state(flat))

    # -- questions -------------------------------------------------------------------------------------------------

    def active_names(self) -> list[str]:
        return [n for n, _ in self.active] if self.enabled else []

    def list_adapters(self) -> dict[str, list[str]]:
        """component -> the loaded adapters that change it (diffusers' get_list_adapters)."""
        out: dict[str, list[str]] = {}
        for name, a in self.loaded.items():
            for component in sorted({t.component for t in a.targets.values()}, key=COMPONENTS.index):
                out.setdefault(component, []).append(name)
        return out


def _weights(w, name: str) -> dict[str, float]:
    def number(v, what):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ValueError(f"adapter weight for {what} must be a finite number, got {v!r}")
        return float(v)

    if isinstance(w, Mapping):
        bad = [k for k in w if k not in COMPONENTS]
        if bad:
            raise ValueError(f"adapter weights for {name!r}: unknown parts {', '.join(map(repr, bad))} (per-block "
                             f"weights are not supported; give a number or {{component: number}} with components "
                             f"{', '.join(COMPONENTS)})")
        return {c: number(w.get(c, 1.0), f"{name!r} {c}") for c in COMPONENTS}
    return dict.fromkeys(COMPONENTS, number(w, repr(name)))
