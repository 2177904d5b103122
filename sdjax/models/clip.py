"""CLIP text and vision encoders (transformers' `CLIPTextModel`, `CLIPTextModelWithProjection`,
`CLIPVisionModelWithProjection`, `CLIPModel`), with the same parameter names so checkpoints load by table.

Text: token + position embeddings, pre-LayerNorm transformer layers with a causal mask, final LayerNorm; the
pooled output is the final hidden state at the end-of-text token. Vision (NHWC pixels): patch conv without bias,
class token, position embeddings, `pre_layrnorm` (transformers' spelling), the same layers, `post_layernorm` on
the class token. Shapes: B batch, L tokens, D width, P projection width.

Checkpoint layouts: every Stable Diffusion text encoder stores `text_model.embeddings...`; transformers >= 5 saves a
bare `CLIPTextModel` without the `text_model.` prefix. Both load; `save_pretrained` writes the prefixed layout,
which every transformers version reads.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sdjax.loading import PretrainedModel, config_fields, state_dict
from sdjax.models.layers import layer_norm, linear

# transformers' ACT2FN names -> functions (torch's GELU is exact erf unless "tanh" is named)
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# before transformers PR #24773 configs said eos_token_id=2 and pooling took argmax(input_ids): the EOS token has
# the largest id of the CLIP vocabulary. Stable Diffusion configs still say 2.
_LEGACY_EOS_TOKEN_ID = 2


# ----------------------------------------------------------------------------------------------------------------
# Configs


# transformers options that do not change inference (sdjax's training of CLIP uses no dropout)
_IGNORED = ("attention_dropout", "dropout", "initializer_range", "initializer_factor")


def _check_common(name, hidden_size, num_attention_heads, hidden_act):
    if hidden_size % num_attention_heads:
        raise ValueError(f"{name}: hidden_size {hidden_size} is not a multiple of num_attention_heads "
                         f"{num_attention_heads}")
    if hidden_act not in _ACTIVATIONS:
        raise ValueError(f"{name}: unsupported hidden_act {hidden_act!r} (supported: {', '.join(_ACTIVATIONS)})")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' `CLIPTextConfig` (`config.json` of a text encoder). A key missing from the file takes
    transformers' default, as transformers does, so that a file means the same model in both."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    architectures: tuple[str, ...] | None = None

    def __post_init__(self):
        _check_common("CLIPTextConfig", self.hidden_size, self.num_attention_heads, self.hidden_act)
        if not isinstance(self.eos_token_id, int):
            raise ValueError(f"CLIPTextConfig: eos_token_id must be one int, got {self.eos_token_id!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        d = config_fields(cls, d, ignore=_IGNORED)
        if d.get("architectures") is not None:
            d["architectures"] = tuple(d["architectures"])
        return cls(**d)

    def to_dict(self) -> dict:
        return _tower_dict(self, "clip_text_model")


def _tower_dict(config, model_type: str) -> dict:
    """A tower config as transformers writes it: its fields, `model_type`, `architectures` only when set."""
    d = dataclasses.asdict(config)
    d["model_type"] = model_type
    if config.architectures is None:
        del d["architectures"]
    else:
        d["architectures"] = list(config.architectures)
    return d


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' `CLIPVisionConfig`; missing keys take transformers' defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    architectures: tuple[str, ...] | None = None

    def __post_init__(self):
        _check_common("CLIPVisionConfig", self.hidden_size, self.num_attention_heads, self.hidden_act)
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPVisionConfig":
        d = config_fields(cls, d, ignore=_IGNORED)
        for key in ("image_size", "patch_size"):  # transformers allows [h, w]; only square is supported here
            if isinstance(d.get(key), (list, tuple)):
                if len(set(d[key])) != 1:
                    raise ValueError(f"CLIPVisionConfig: non-square {key} {d[key]} is not supported")
                d[key] = int(d[key][0])
        if d.get("architectures") is not None:
            d["architectures"] = tuple(d["architectures"])
        return cls(**d)

    def to_dict(self) -> dict:
        return _tower_dict(self, "clip_vision_model")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """transformers' `CLIPConfig`: nested `text_config` and `vision_config`, shared `projection_dim`."""

    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    architectures: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        d = dict(d)
        for key in ("text_config", "vision_config", "text_config_dict", "vision_config_dict"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ValueError(f"CLIPConfig: {key} must be an object, got {type(d[key]).__name__}")
        # older files carry `text_config_dict` / `vision_config_dict`, which override `text_config` / `vision_config`
        text = {**(d.get("text_config") or {}), **(d.get("text_config_dict") or {})}
        vision = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        d = config_fields(cls, d, ignore=_IGNORED + ("text_config_dict", "vision_config_dict"))
        d["text_config"] = CLIPTextConfig.from_dict(text)
        d["vision_config"] = CLIPVisionConfig.from_dict(vision)
        if d.get("architectures") is not None:
            d["architectures"] = tuple(d["architectures"])
        return cls(**d)

    def to_dict(self) -> dict:
        d = {
            "model_type": "clip",
            "text_config": self.text_config.to_dict(),
            "vision_config": self.vision_config.to_dict(),
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
        }
        if self.architectures is not None:
            d["architectures"] = list(self.architectures)
        return d


# ----------------------------------------------------------------------------------------------------------------
# Outputs (pytrees, so they can leave a jitted function)


@struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array  # (B, L, D) after final_layer_norm
    pooler_output: jax.Array  # (B, D) last_hidden_state at the end-of-text token
    hidden_states: tuple[jax.Array, ...] | None = None  # embeddings, then each layer's output (before final LN)
    text_embeds: jax.Array | None = None  # (B, P) text_projection(pooler_output), with projection only


@struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array  # (B, 1 + patches, D), no final norm (as transformers)
    pooler_output: jax.Array  # (B, D) post_layernorm of the class token
    hidden_states: tuple[jax.Array, ...] | None = None  # encoder input (after pre_layrnorm), then each layer
    image_embeds: jax.Array | None = None  # (B, P) visual_projection(pooler_output), with projection only


@struct.dataclass
class CLIPOutput:
    logits_per_image: jax.Array  # (B_image, B_text) scaled cosine similarities
    logits_per_text: jax.Array  # (B_text, B_image)
    text_embeds: jax.Array  # (B_text, P) unit-normalised
    image_embeds: jax.Array  # (B_image, P) unit-normalised
    text_model_output: CLIPTextOutput
    vision_model_output: CLIPVisionOutput


# ----------------------------------------------------------------------------------------------------------------
# Shared layers


def _masked_attention(q, k, v, heads, mask):
    """(B, L, heads*d) arrays; mask (B or 1, 1, Lq, Lk) bool, True = may attend. Softmax in float32.

    Masked scores are set to the dtype's minimum, as transformers' eager path adds it: a fully masked row then
    attends uniformly instead of producing NaN.
    """
    b, lq, inner = q.shape
    d = inner // heads
    q = q.reshape(b, lq, heads, d)
    k = k.reshape(b, k.shape[1], heads, d)
    v = v.reshape(b, v.shape[1], heads, d)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (1.0 / math.sqrt(d))
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, lq, inner)


class CLIPAttention(nnx.Module):
    def __init__(self, dim, heads, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.heads = heads
        self.k_proj = linear(dim, dim, **kw)
        self.v_proj = linear(dim, dim, **kw)
        self.q_proj = linear(dim, dim, **kw)
        self.out_proj = linear(dim, dim, **kw)

    def __call__(self, x, mask=None):
        out = _masked_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, dim, inner, act, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act = act
        self.fc1 = linear(dim, inner, **kw)
        self.fc2 = linear(inner, dim, **kw)

    def __call__(self, x):
        return self.fc2(_ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LayerNorm self-attention and MLP, each residual."""

    def __init__(self, config, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dim = config.hidden_size
        self.self_attn = CLIPAttention(dim, config.num_attention_heads, **kw)
        self.layer_norm1 = layer_norm(dim, config.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(dim, config.intermediate_size, config.hidden_act, **kw)
        self.layer_norm2 = layer_norm(dim, config.layer_norm_eps, **kw)

    def __call__(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config, *, rngs, dtype, param_dtype):
        self.layers = nnx.List([
            CLIPEncoderLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            for _ in range(config.num_hidden_layers)
        ])

    def __call__(self, x, mask=None, output_hidden_states=False):
        """-> (output, hidden states: the input then each layer's output, or None)."""
        states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            states.append(x)
        return x, (tuple(states) if output_hidden_states else None)


# ----------------------------------------------------------------------------------------------------------------
# Text


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size, **kw)

    def __call__(self, input_ids):
        positions = jnp.arange(input_ids.shape[-1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPTextTransformer(nnx.Module):
    """transformers' text tower (`text_model.*` in checkpoints)."""

    def __init__(self, config: CLIPTextConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.max_position_embeddings = config.max_position_embeddings
        self.eos_token_id = config.eos_token_id
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, **kw)
        self.final_layer_norm = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False) -> CLIPTextOutput:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        b, length = input_ids.shape
        if length > self.max_position_embeddings:
            raise ValueError(f"input_ids has {length} tokens; this text encoder takes at most "
                             f"{self.max_position_embeddings}")
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:  # padding: no query attends to a padded key
            mask = mask & (jnp.asarray(attention_mask) != 0)[:, None, None, :]
        x = self.embeddings(input_ids)
        x, hidden_states = self.encoder(x, mask, output_hidden_states)
        last = self.final_layer_norm(x)
        if self.eos_token_id == _LEGACY_EOS_TOKEN_ID:
            eos = jnp.argmax(input_ids, axis=-1)
        else:  # the first end-of-text token (padding may repeat it)
            eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        return CLIPTextOutput(last, last[jnp.arange(b), eos], hidden_states)


_TEXT_ONLY_PREFIXES = ("embeddings.", "encoder.", "final_layer_norm.")
TOKEN_TABLE = "text_model.embeddings.token_embedding.weight"


def save_text_model(model, path, variant=None, dtype=None, vocab_size: int | None = None) -> None:
    """`save_pretrained` of the CLIP text models; vocab_size: keep only the token table's first rows (a pipeline's
    textual inversion grows the table, and its config with it, past the model's own vocabulary)."""
    rows = vocab_size or model.config.vocab_size
    state = state_dict(model, dtype)
    state[TOKEN_TABLE] = state[TOKEN_TABLE][:rows]
    config = dataclasses.replace(model.config, vocab_size=rows).to_dict()
    model.write_pretrained(path, config, state, variant)


class CLIPTextModel(PretrainedModel, nnx.Module):
    """`te(input_ids (B, L) int, attention_mask (B, L) or None, output_hidden_states)` -> CLIPTextOutput.

    Stable Diffusion passes no attention_mask (padding tokens are attended to, causally, as in training).
    """

    config_class = CLIPTextConfig
    weight_stems = ("model",)
    ignored_checkpoint_keys = (r"(text_model\.)?embeddings\.position_ids",)

    @classmethod
    def checkpoint_key_renames(cls, key: str) -> str:
        # transformers >= 5 saves a bare CLIPTextModel without the `text_model.` prefix
        return "text_model." + key if key.startswith(_TEXT_ONLY_PREFIXES) else key

    def __init__(self, config: CLIPTextConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        self.text_model = CLIPTextTransformer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False) -> CLIPTextOutput:
        return self.text_model(input_ids, attention_mask, output_hidden_states)

    def save_pretrained(self, path, variant=None, dtype=None, vocab_size: int | None = None) -> None:
        save_text_model(self, path, variant, dtype, vocab_size)


class CLIPTextModelWithProjection(PretrainedModel, nnx.Module):
    """CLIPTextModel plus `text_projection` (no bias): output.text_embeds (B, projection_dim). SDXL's
    `text_encoder_2`."""

    config_class = CLIPTextConfig
    weight_stems = ("model",)
    ignored_checkpoint_keys = (r"text_model\.embeddings\.position_ids",)

    def __init__(self, config: CLIPTextConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.text_model = CLIPTextTransformer(config, **kw)
        self.text_projection = linear(config.hidden_size, config.projection_dim, bias=False, **kw)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False) -> CLIPTextOutput:
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        return out.replace(text_embeds=self.text_projection(out.pooler_output))

    def save_pretrained(self, path, variant=None, dtype=None, vocab_size: int | None = None) -> None:
        save_text_model(self, path, variant, dtype, vocab_size)


# ----------------------------------------------------------------------------------------------------------------
# Vision


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, rngs, dtype, param_dtype):
        p, dim = config.patch_size, config.hidden_size
        self.image_size = config.image_size
        self.dtype = dtype
        self.class_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (dim,), param_dtype) * dim**-0.5
        )
        self.patch_embedding = nnx.Conv(
            config.num_channels, dim, (p, p), strides=(p, p), padding="VALID", use_bias=False,
            rngs=rngs, dtype=dtype, param_dtype=param_dtype,
        )
        self.position_embedding = nnx.Embed(config.num_positions, dim, rngs=rngs, dtype=dtype,
                                            param_dtype=param_dtype)

    def __call__(self, pixel_values):
        b, h, w, _ = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values are {h}x{w}; this vision model takes "
                             f"{self.image_size}x{self.image_size} (NHWC)")
        patches = self.patch_embedding(pixel_values.astype(self.dtype))  # (B, h/p, w/p, D)
        patches = patches.reshape(b, -1, patches.shape[-1])  # row-major, as torch's flatten(2)
        cls = jnp.broadcast_to(self.class_embedding.astype(patches.dtype), (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding(jnp.arange(x.shape[1]))[None]


class CLIPVisionTransformer(nnx.Module):
    """transformers' vision tower (`vision_model.*` in checkpoints)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = CLIPVisionEmbeddings(config, **kw)
        self.pre_layrnorm = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)
        self.encoder = CLIPEncoder(config, **kw)
        self.post_layernorm = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)

    def __call__(self, pixel_values, output_hidden_states=False) -> CLIPVisionOutput:
        x = self.pre_layrnorm(self.embeddings(jnp.asarray(pixel_values)))
        x, hidden_states = self.encoder(x, None, output_hidden_states)
        return CLIPVisionOutput(x, self.post_layernorm(x[:, 0]), hidden_states)


class CLIPVisionModelWithProjection(PretrainedModel, nnx.Module):
    """`m(pixel_values (B, H, W, C) normalised as CLIP's image processor does)` -> CLIPVisionOutput with
    image_embeds (B, projection_dim)."""

    config_class = CLIPVisionConfig
    weight_stems = ("model",)
    ignored_checkpoint_keys = (r"vision_model\.embeddings\.position_ids",)

    def __init__(self, config: CLIPVisionConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, **kw)
        self.visual_projection = linear(config.hidden_size, config.projection_dim, bias=False, **kw)

    def __call__(self, pixel_values, output_hidden_states=False) -> CLIPVisionOutput:
        out = self.vision_model(pixel_values, output_hidden_states)
        return out.replace(image_embeds=self.visual_projection(out.pooler_output))


# ----------------------------------------------------------------------------------------------------------------
# Both towers


# OpenAI CLIP's image normalisation (transformers' CLIPImageProcessor defaults)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def unit_norm(x):
    """x / |x| along the last axis (CLIP's embedding normalisation)."""
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


class CLIPModel(PretrainedModel, nnx.Module):
    """Text and vision towers with projections into one space; `logit_scale` is the log temperature."""

    config_class = CLIPConfig
    weight_stems = ("model",)
    ignored_checkpoint_keys = (r"(text|vision)_model\.embeddings\.position_ids",)

    def __init__(self, config: CLIPConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.text_model = CLIPTextTransformer(config.text_config, **kw)
        self.vision_model = CLIPVisionTransformer(config.vision_config, **kw)
        self.visual_projection = linear(config.vision_config.hidden_size, config.projection_dim, bias=False, **kw)
        self.text_projection = linear(config.text_config.hidden_size, config.projection_dim, bias=False, **kw)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype))

    def get_text_features(self, input_ids, attention_mask=None) -> jax.Array:
        """(B, L) token ids -> (B, projection_dim) projected pooled text features (not normalised)."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

    def get_image_features(self, pixel_values) -> jax.Array:
        """(B, H, W, C) pixels -> (B, projection_dim) projected pooled image features (not normalised)."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def __call__(self, input_ids, pixel_values, attention_mask=None) -> CLIPOutput:
        text_out = self.text_model(input_ids, attention_mask)
        vision_out = self.vision_model(pixel_values)
        # similarities in float32 whatever the compute dtype: they are compared and ranked
        text_embeds = unit_norm(self.text_projection(text_out.pooler_output).astype(jnp.float32))
        image_embeds = unit_norm(self.visual_projection(vision_out.pooler_output).astype(jnp.float32))
        scale = jnp.exp(self.logit_scale.get_value().astype(jnp.float32))
        logits_per_text = (text_embeds @ image_embeds.T) * scale
        return CLIPOutput(logits_per_text.T, logits_per_text, text_embeds, image_embeds, text_out, vision_out)


def model_class_for(config: dict) -> type:
    """The sdjax class for a transformers CLIP `config.json` (by `architectures`, else by keys)."""
    arch = (config.get("architectures") or [None])[0]
    classes = {c.__name__: c for c in (CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection,
                                       CLIPModel)}
    if arch in classes:
        return classes[arch]
    if "text_config" in config or "vision_config" in config:
        return CLIPModel
    return CLIPTextModel


__all__ = [
    "CLIPConfig", "CLIPModel", "CLIPOutput", "CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection",
    "CLIPTextOutput", "CLIPVisionConfig", "CLIPVisionModelWithProjection", "CLIPVisionOutput", "model_class_for",
]
