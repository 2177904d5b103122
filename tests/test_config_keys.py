"""One policy for the keys of every network config (`sdjax.loading.config_fields`): bookkeeping is dropped
silently, an unknown key warns once naming it, an option that would change the math to something sdjax does not
compute raises, and every real config loads without a warning."""
from __future__ import annotations

import dataclasses
import inspect
import json
import warnings
from pathlib import Path

import diffusers
import pytest
import transformers

from sdjax.loading import CONFIG_BOOKKEEPING
from sdjax.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from sdjax.models.unet import UNetConfig
from sdjax.models.vae import VAEConfig

ROOT = Path(__file__).resolve().parents[1] / "sdjax"
CONFIG_CLASSES = [CLIPTextConfig, CLIPVisionConfig, CLIPConfig, VAEConfig, UNetConfig]


def _from_dict_silently(cls, d):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return cls.from_dict(d)


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_unknown_key_warns_once_naming_it(cls):
    key = f"sdjax_test_unknown_{cls.__name__}"  # a key no other test uses: the warning is once per process
    d = {key: 1, "_class_name": "X", "_diffusers_version": "0.1", "transformers_version": "4.0"}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # so that only sdjax's own once-only rule can hold a repeat back
        first = cls.from_dict(d)
        again = cls.from_dict(d)
    assert [str(w.message) for w in record] == [f"{cls.__name__}: ignoring unknown config keys {key} (sdjax does "
                                                "not read them)"]
    assert first == again == cls.from_dict({})  # dropped, as diffusers and transformers drop unknown keys
    with pytest.warns(UserWarning, match=f"{key}, {key}_2"):  # another set of keys warns again, all named
        cls.from_dict({key: 1, f"{key}_2": 2})


@pytest.mark.parametrize("cls, key, value", [
    (CLIPTextConfig, "hidden_act", "relu"),
    (CLIPVisionConfig, "hidden_act", "relu"),
    (VAEConfig, "act_fn", "gelu"),
    (VAEConfig, "down_block_types", ["AttnDownEncoderBlock2D"]),
    (UNetConfig, "resnet_time_scale_shift", "scale_shift"),
    (UNetConfig, "class_embed_type", "timestep"),
    (UNetConfig, "time_embedding_type", "fourier"),
    (UNetConfig, "attention_type", "gated"),
    (UNetConfig, "reverse_transformer_layers_per_block", [[1], [1], [1], [1]]),
    (UNetConfig, "act_fn", "gelu"),
])
def test_math_changing_value_raises_one_line(cls, key, value):
    with pytest.raises(ValueError) as err:
        cls.from_dict({key: value})
    message = str(err.value)
    assert key in message and repr(value) in message and "\n" not in message, message


def test_every_unet_option_of_diffusers_is_read_or_refused():
    """Each `UNet2DConditionModel` argument is a field, or refuses a value sdjax does not compute; only these few
    are accepted with any value. A new diffusers option fails here instead of being silently ignored."""
    accepted = {"dropout", "addition_embed_type_num_heads",  # no effect on inference with the supported blocks
                "attention_head_dim"}  # diffusers' name for the head count, read as num_attention_heads
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    params = set(inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters) - {"self"}
    assert not params & CONFIG_BOOKKEEPING
    for name in sorted(params - fields - accepted):
        with pytest.raises(ValueError, match=f"{name} = 'sdjax-unsupported'"):
            UNetConfig.from_dict({name: "sdjax-unsupported"})


def test_every_vae_option_of_diffusers_is_a_field():
    params = set(inspect.signature(diffusers.AutoencoderKL.__init__).parameters) - {"self"}
    assert params <= {f.name for f in dataclasses.fields(VAEConfig)}
    assert not params & CONFIG_BOOKKEEPING


@pytest.mark.parametrize("theirs, ours", [(transformers.CLIPTextConfig, CLIPTextConfig),
                                          (transformers.CLIPVisionConfig, CLIPVisionConfig),
                                          (transformers.CLIPConfig, CLIPConfig)], ids=lambda c: c.__name__)
def test_transformers_clip_configs_load_silently(theirs, ours):
    """Every key transformers writes for a CLIP config is a field, bookkeeping or an option without effect on
    inference, so its own config.json loads without a warning, and means the same model."""
    config = _from_dict_silently(ours, theirs().to_dict())
    assert config == ours.from_dict({})


# transformers 4.x wrote every PretrainedConfig attribute, generation defaults included, into each config.json
LEGACY_TRANSFORMERS_KEYS = {
    "_name_or_path": "", "_commit_hash": None, "add_cross_attention": False, "architectures": None,
    "bad_words_ids": None, "begin_suppress_tokens": None, "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None, "decoder_start_token_id": None, "diversity_penalty": 0.0,
    "do_sample": False, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None, "finetuning_task": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False,
    "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0, "max_length": 20,
    "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False, "prefix": None,
    "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False, "repetition_penalty": 1.0,
    "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None, "suppress_tokens": None,
    "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tie_word_embeddings": True, "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": None,
    "torchscript": False, "transformers_version": "4.27.0.dev0", "typical_p": 1.0, "use_bfloat16": False,
}


def test_legacy_transformers_clip_config_loads_silently():
    raw = json.loads((ROOT / "model_configs" / "clip_vit_l14_text.json").read_text())
    legacy = {**LEGACY_TRANSFORMERS_KEYS, **raw}
    assert _from_dict_silently(CLIPTextConfig, legacy) == CLIPTextConfig.from_dict(raw)
    vision = {**LEGACY_TRANSFORMERS_KEYS, "hidden_size": 1024, "num_attention_heads": 16, "patch_size": 14}
    nested = {"text_config": legacy, "vision_config": vision, "text_config_dict": None, "projection_dim": 768,
              "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "model_type": "clip"}
    assert _from_dict_silently(CLIPConfig, nested).vision_config.patch_size == 14


REAL = sorted((ROOT / "model_configs").glob("*.json")) + sorted((ROOT / "default_model").glob("*/*/config.json")) \
    + [ROOT / "default_model" / "clip" / "config.json"]


@pytest.mark.parametrize("path", REAL, ids=lambda p: str(p.relative_to(ROOT)))
def test_real_configs_load_without_warnings(path):
    raw = json.loads(path.read_text())
    if path.stem.endswith("scheduler"):
        from sdjax.samplers import SchedulerConfig

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            SchedulerConfig.from_dict(raw)
        return
    if "unet" in path.stem or path.parent.name == "unet":
        cls = UNetConfig
    elif "vae" in path.stem or path.parent.name == "vae":
        cls = VAEConfig
    else:
        cls = CLIPConfig if "text_config" in raw else CLIPTextConfig
    _from_dict_silently(cls, raw)


def test_real_configs_cover_every_file():
    assert len(REAL) == len(list((ROOT / "model_configs").glob("*.json"))) + 4  # shipped unet, vae, text, clip
