"""Which parameter of which network an adapter patch changes.

The modules an adapter can change are the Linear and Conv layers of the UNet and text encoders, named by their
diffusers / transformers paths (`sdjax.loading.conversion_table`: the attribute names are the reference's). A patch
names its module
- dotted (diffusers / PEFT): the path itself (text encoders also without transformers' `text_model.`);
- kohya: the path with "_" for "." (`down_blocks_1_attentions_0_proj_in`), matched against the paths so joined;
- kohya SDXL: the original UNet layout with "_" (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
  `middle_block_0_in_layers_2`, `output_blocks_2_1_conv`, `time_embed_0`, `label_emb_0_0`, `out_2`), mapped to the
  diffusers path by `sdjax.original_layout.unet_module_name`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

import jax
from flax import nnx

from sdjax import original_layout
from sdjax.loading import CONV, LINEAR, conversion_table
from sdjax.lora.formats import DOTTED, AdapterFile, AdapterFormatError, Patch

# an entry of the original UNet layout, "_"-joined: (input|output)_blocks_<i>_<j>[_rest], middle_block_<i>_rest,
# and the fixed layers outside the blocks
_ORIGINAL = re.compile(r"(?P<where>input_blocks|output_blocks)_(?P<i>\d+)_(?P<j>\d+)(?:_(?P<rest>.+))?"
                       r"|middle_block_(?P<mid>\d+)_(?P<mrest>.+)"
                       r"|(?P<fixed>time_embed|out|label_emb_0)_(?P<n>\d+)")
_RESNET_LAYERS = {name.replace(".", "_"): name for name in original_layout.UNET_RESNET_LAYERS}


@dataclasses.dataclass(frozen=True)
class Target:
    """One changeable weight: `component` (network name), `module` (its path), `path` (the nnx param's path),
    `transform` (loading.CONV / LINEAR: how the PyTorch-layout delta maps onto the flax kernel), `shape` (the weight's
    PyTorch-layout shape: (out, in) or (out, in, kh, kw))."""

    component: str
    module: str
    path: tuple
    transform: str
    shape: tuple

    @property
    def key(self) -> str:
        return f"{self.component}.{self.module}"


def _torch_shape(kernel_shape: tuple, transform: str) -> tuple:
    if transform == CONV:  # (kh, kw, in, out)
        return (kernel_shape[3], kernel_shape[2], kernel_shape[0], kernel_shape[1])
    return (kernel_shape[1], kernel_shape[0])


class Targets:
    """The changeable weights of a pipeline's networks.

    networks: component name ("unet", "text_encoder", "text_encoder_2") -> module; `layers_per_block` (one value
    for all levels) lets kohya SDXL names in the original layout resolve; `sdxl`: the UNet has SDXL's add-embedding
    (`label_emb`)."""

    def __init__(self, networks: Mapping[str, nnx.Module], *, layers_per_block: int | None = None,
                 sdxl: bool = False):
        self.components = tuple(networks)
        self.layers_per_block = layers_per_block
        self.sdxl = sdxl
        self._dotted: dict[str, dict[str, Target]] = {}
        self._joined: dict[str, dict[str, Target | None]] = {}  # None: two modules join to the same name
        for component, module in networks.items():
            dotted, joined = {}, {}
            for key, entry in conversion_table(module).items():
                if entry.transform not in (CONV, LINEAR) or not key.endswith(".weight"):
                    continue
                name = key[:-len(".weight")]
                target = Target(component, name, entry.path, entry.transform, _torch_shape(entry.shape,
                                                                                           entry.transform))
                aliases = [name] + ([name[len("text_model."):]] if name.startswith("text_model.") else [])
                for alias in aliases:
                    dotted[alias] = target
                    j = alias.replace(".", "_")
                    joined[j] = target if j not in joined or joined[j] == target else None
            self._dotted[component] = dotted
            self._joined[component] = joined

    def find(self, patch: Patch) -> Target | None:
        """The weight `patch` changes, or None where its name is no module of this network."""
        if patch.component not in self._dotted:
            return None
        if patch.layout == DOTTED:
            return self._dotted[patch.component].get(patch.name)
        joined = self._joined[patch.component]
        if patch.name in joined:
            return joined[patch.name]
        if patch.component == "unet" and self.layers_per_block is not None:
            name = self._from_original(patch.name)
            if name is not None:
                return joined.get(name.replace(".", "_"))
        return None

    def _from_original(self, name: str) -> str | None:
        m = _ORIGINAL.fullmatch(name)
        if m is None:
            return None
        if m["fixed"]:
            original = f"{m['fixed'].replace('_0', '.0')}.{m['n']}"
        else:
            entry, rest = ((f"{m['where']}.{m['i']}.{m['j']}", m["rest"]) if m["where"]
                           else (f"middle_block.{m['mid']}", m["mrest"]))
            original = entry if rest is None else f"{entry}.{_RESNET_LAYERS.get(rest, rest)}"
        return original_layout.unet_module_name(original, self.layers_per_block, sdxl=self.sdxl)

    def resolve(self, adapter: AdapterFile) -> list[tuple[Target, Patch]]:
        """(target, patch) for every patch; one-line AdapterFormatError naming the first few patches that name no
        module here (or a network the pipeline lacks), or whose delta does not fit the module's weight."""
        pairs, unmatched, missing_networks, wrong = [], [], set(), []
        seen: dict[str, str] = {}
        for patch in adapter.patches:
            if patch.component not in self._dotted:
                missing_networks.add(patch.component)
                continue
            target = self.find(patch)
            if target is None:
                unmatched.append(patch.describe())
                continue
            if target.key in seen:
                raise AdapterFormatError(f"{adapter.source}: {seen[target.key]} and {patch.describe()} both change "
                                         f"{target.key}")
            seen[target.key] = patch.describe()
            shape = patch.factors.shape()
            if shape[0] != target.shape[0] or math.prod(shape) != math.prod(target.shape):
                wrong.append(f"{patch.describe()} {shape} vs {target.key} {target.shape}")
                continue
            pairs.append((target, patch))
        if missing_networks:
            raise AdapterFormatError(f"{adapter.source}: changes {', '.join(sorted(missing_networks))}, which this "
                                     f"pipeline does not have (it has {', '.join(self.components)})")
        if unmatched:
            more = f" (+{len(unmatched) - 3} more)" if len(unmatched) > 3 else ""
            raise AdapterFormatError(f"{adapter.source}: {len(unmatched)} modules match no layer of this pipeline: "
                                     f"{', '.join(unmatched[:3])}{more}")
        if wrong:
            more = f" (+{len(wrong) - 2} more)" if len(wrong) > 2 else ""
            raise AdapterFormatError(f"{adapter.source}: adapter shapes do not fit the model (another base model?): "
                                     f"{'; '.join(wrong[:2])}{more}")
        return pairs


def unet_layout(unet) -> tuple[int | None, bool]:
    """(layers_per_block if one value for every level else None, whether the UNet has SDXL's add-embedding)."""
    per_block = set(unet.config.layers_per_block)
    return (per_block.pop() if len(per_block) == 1 else None), unet.config.addition_embed_type == "text_time"


def is_abstract(module: nnx.Module) -> bool:
    return any(isinstance(v.get_value(), jax.ShapeDtypeStruct)
               for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))
