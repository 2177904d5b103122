"""CLIP text/vision encoders and the tokenizer against transformers, with tiny random models made here (fp32).

Every torch parameter is randomised (LayerNorm scales around 1, biases non-zero) so that a swapped or
untransposed weight shows up in the outputs.
"""
import json
import math
import os
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from sdjax.loading import CheckpointMismatchError, count_params
from sdjax.models import clip
from sdjax.tokenizer import PACKAGED, Tokenizer

CONFIGS = Path(clip.__file__).parent.parent / "model_configs"
TOL = 1e-5
LOGITS_TOL = 1e-4  # logits are cosine similarities times exp(logit_scale) = 100

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "A Café's neon sign, 3 cats & 2 dogs -- oil painting, highly detailed!!",
]
LONG_PROMPT = " ".join(["a red apple on a wooden table in the morning light"] * 9)  # > 77 tokens

TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=16, max_position_embeddings=77)
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   projection_dim=16, image_size=32, patch_size=8, num_channels=3)


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            if name == "logit_scale":
                p.fill_(math.log(100.0))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model.eval()


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b.detach().numpy(), np.float64))))


def _save(model, folder):
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _jit_text(model):
    return nnx.jit(lambda m, ids, mask: m(ids, mask, output_hidden_states=True))


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained()


@pytest.fixture(scope="module")
def sd2_tok_dir(tmp_path_factory):
    """A tokenizer folder as SD2.x / SDXL `tokenizer_2` ship it: slow-tokenizer files, pad token "!"."""
    folder = tmp_path_factory.mktemp("sd2_tokenizer")
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((PACKAGED / name).read_bytes())
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}))
    return folder


def _hf_ids(hf, prompts, max_length=77):
    enc = hf(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"]


def test_tokenizer_matches_transformers(tok):
    hf = transformers.CLIPTokenizer.from_pretrained(str(PACKAGED), local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation warning for short prompts
        ids, mask = tok(PROMPTS)
    want_ids, want_mask = _hf_ids(hf, PROMPTS)
    assert ids.dtype == np.int32 and ids.shape == (3, 77) and mask.shape == (3, 77)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    assert ids[0, 0] == tok.bos_token_id == 49406
    assert tok.pad_token_id == tok.eos_token_id == 49407  # SD1.x pads with <|endoftext|>
    n = int(mask[0].sum())
    assert ids[0, n - 1] == 49407 and (ids[0, n:] == 49407).all()


def test_tokenizer_truncates_with_warning(tok):
    hf = transformers.CLIPTokenizer.from_pretrained(str(PACKAGED), local_files_only=True)
    full = hf([LONG_PROMPT])["input_ids"][0]
    assert len(full) > 77
    dropped = hf.batch_decode([full[76:-1]])[0]  # what diffusers reports
    with pytest.warns(UserWarning, match="truncated") as record:
        tokens = tok.encode([PROMPTS[0], LONG_PROMPT])
    assert dropped in str(record[0].message)
    assert tokens.truncated == (None, dropped)
    want_ids, want_mask = _hf_ids(hf, [PROMPTS[0], LONG_PROMPT])
    np.testing.assert_array_equal(tokens.input_ids, want_ids)
    np.testing.assert_array_equal(tokens.attention_mask, want_mask)
    assert tokens.input_ids[1, -1] == 49407 and tokens.attention_mask[1].all()


def test_tokenizer_folder_pad_token(sd2_tok_dir):
    tok2 = Tokenizer.from_pretrained(sd2_tok_dir)
    hf = transformers.CLIPTokenizer.from_pretrained(str(sd2_tok_dir), local_files_only=True)
    ids, mask = tok2(PROMPTS)
    want_ids, want_mask = _hf_ids(hf, PROMPTS)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    assert tok2.pad_token_id == 0  # "!"
    n = int(mask[0].sum())
    assert ids[0, n - 1] == 49407 and (ids[0, n:] == 0).all()


def test_tokenizer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        Tokenizer.from_pretrained(tmp_path)


# The packaged tokenizer is vocab.json + merges.txt (+ config); tokenizer.json, which holds the same vocabulary and
# merges, is not shipped. These ids were computed with the original openai/clip-vit-large-patch14 folder, its
# tokenizer.json included (transformers 5.24): the sha256 of json.dumps of the unpadded, untruncated ids of
# GOLDEN_PROMPTS + _generated_prompts().
GOLDEN_PROMPTS = [
    "a red circle on a blue background",
    "  Hello   WORLD!!\tdon't   it's I'M 3.14 <|endoftext|>",
    "café naïve résumé – “quotes” 日本語 テスト 🐱🚀 ﬁ Å",
    " ".join(["an oil painting of a lighthouse above a stormy sea at dusk — dramatic clouds, crashing waves, "
              "golden hour, 8k résumé 日本語 🐱"] * 3),  # 98 tokens
]
GOLDEN_IDS = {0: [49406, 320, 736, 7117, 525, 320, 1746, 5994, 49407],
              1: [49406, 3306, 1002, 748, 847, 713, 585, 568, 328, 880, 274, 269, 272, 275, 49407, 49407]}
GOLDEN_SHA256 = "26c2c18cdcd9ca606b8eea1fc36b9a656c7987c7e2f9d4ca0d59f083ab1f7add"


def _generated_prompts(vocab):
    """300 strings of random vocabulary words and 300 of random characters (ASCII, Latin/Greek/Cyrillic/symbols,
    CJK, emoji)."""
    import random

    words = {v: k.replace("</w>", "") for k, v in vocab.items()}
    rng = random.Random(0)
    out = []
    for _ in range(300):
        out.append(" ".join(words[rng.randrange(49406)] for _ in range(rng.randint(1, 30))))
        out.append("".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xa0, 0x3000),
                                           rng.randrange(0x3000, 0xa000), rng.randrange(0x1f300, 0x1f700)]))
                           for _ in range(rng.randint(1, 60))))
    return out


def test_packaged_tokenizer_ids_equal_the_original_tokenizer_json(tok):
    import hashlib

    vocab = json.loads((PACKAGED / "vocab.json").read_text(encoding="utf-8"))
    prompts = GOLDEN_PROMPTS + _generated_prompts(vocab)
    shipped = PACKAGED.parents[1]
    assert PACKAGED == shipped / "pipeline" / "tokenizer" and not (PACKAGED / "tokenizer.json").exists()
    for folder in (PACKAGED, shipped / "clip"):  # the shipped pipeline's and CLIP's, as transformers reads them
        hf = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        ids = hf(prompts, verbose=False)["input_ids"]
        assert {i: ids[i] for i in GOLDEN_IDS} == GOLDEN_IDS
        assert len(ids[3]) == 98
        assert hashlib.sha256(json.dumps(ids).encode()).hexdigest() == GOLDEN_SHA256, folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation of the long prompts
        got, mask = tok(prompts)
    for row, m, want in zip(got, mask, ids):
        want = want[:76] + [49407] if len(want) > 77 else want
        assert row[:len(want)].tolist() == want and m.sum() == len(want) and (row[len(want):] == 49407).all()


def test_tokenizer_import_without_torch_is_quiet():
    # sdjax needs transformers for the tokenizer only; imported without torch, transformers logs "PyTorch was not
    # found..." to stderr, which sdjax drops (that message only). Control: transformers imported first does log it.
    import subprocess
    import sys

    script = ("import sys; sys.modules['torch'] = None\n"  # torch unimportable, as in an install without it
              "{}\n"
              "from sdjax.tokenizer import Tokenizer\n"
              "print(Tokenizer.from_pretrained()(['a red circle'])[0][0, :3].tolist())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    for first, loud in (("", False), ("import transformers", True)):
        proc = subprocess.run([sys.executable, "-c", script.format(first)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == "[49406, 320, 736]"
        assert ("PyTorch was not found" in proc.stderr) == loud, proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# Text encoders


def _random_ids(n_vocab, eos_id, legacy, batch=3, length=20, seed=0):
    """Random ids below the special ids with an EOS per row; positions where the two pooling rules differ."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, n_vocab - 2, (batch, length))
    ids[ids == eos_id] = 3
    mask = np.zeros((batch, length), np.int64)
    for row, end in enumerate([5, 12, length - 1][:batch]):
        if legacy:  # pooled at argmax(ids): the largest id, not the token 2
            ids[row, 1] = 2
            ids[row, end] = n_vocab - 1
        else:  # pooled at the first EOS; later EOS are padding
            ids[row, end:] = eos_id
        mask[row, : end + 1] = 1
    return ids, mask


TEXT_CASES = {
    # name: (model class, config overrides, id source)
    "sd1_quick_gelu_legacy_eos": ("CLIPTextModel", dict(vocab_size=49408, hidden_act="quick_gelu", eos_token_id=2,
                                                        bos_token_id=0, pad_token_id=1), "tokenizer"),
    "sd2_gelu_legacy_eos_pad_bang": ("CLIPTextModel", dict(vocab_size=49408, hidden_act="gelu", eos_token_id=2,
                                                           bos_token_id=0, pad_token_id=1), "tokenizer_sd2"),
    "proj_gelu_eos49407": ("CLIPTextModelWithProjection", dict(vocab_size=49408, hidden_act="gelu"), "tokenizer_sd2"),
    # EOS is not the largest id here: only the first-EOS rule finds it
    "proj_quick_gelu_small_vocab": ("CLIPTextModelWithProjection",
                                    dict(vocab_size=1000, hidden_act="quick_gelu", eos_token_id=500,
                                         bos_token_id=998), "random"),
    "gelu_small_vocab_legacy_eos": ("CLIPTextModel", dict(vocab_size=1000, hidden_act="gelu", eos_token_id=2,
                                                          bos_token_id=0), "random_legacy"),
}


@pytest.fixture(scope="module")
def text_cases(tmp_path_factory, tok, sd2_tok_dir):
    """name -> case, each built (torch model, files, sdjax model, jitted call) once per module, when first asked."""
    cache = {}

    def build(name):
        cls_name, overrides, source = TEXT_CASES[name]
        config = transformers.CLIPTextConfig(**TINY_TEXT, **overrides)
        torch_model = _randomize(getattr(transformers, cls_name)(config), seed=len(name))
        folder = _save(torch_model, tmp_path_factory.mktemp(name))
        if source == "tokenizer":
            ids, mask = tok(PROMPTS)
        elif source == "tokenizer_sd2":
            ids, mask = Tokenizer.from_pretrained(sd2_tok_dir)(PROMPTS)
        else:
            ids, mask = _random_ids(config.vocab_size, config.eos_token_id, legacy=source == "random_legacy")
        model = getattr(clip, cls_name).from_pretrained(folder)
        return dict(name=name, torch=torch_model, model=model, folder=folder, ids=np.asarray(ids),
                    mask=np.asarray(mask), fn=_jit_text(model), cls_name=cls_name)

    def get(name):
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    return get


@pytest.fixture(params=list(TEXT_CASES))
def text_case(request, text_cases):
    return text_cases(request.param)


@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "padding_mask"])
def test_text_parity(text_case, use_mask):
    ids, mask = text_case["ids"], text_case["mask"] if use_mask else None
    with torch.no_grad():
        want = text_case["torch"](torch.from_numpy(ids.astype(np.int64)),
                                  attention_mask=None if mask is None else torch.from_numpy(mask.astype(np.int64)),
                                  output_hidden_states=True)
    got = text_case["fn"](text_case["model"], jnp.asarray(ids, jnp.int32),
                          None if mask is None else jnp.asarray(mask))
    diffs = {"last_hidden_state": _diff(got.last_hidden_state, want.last_hidden_state),
             "penultimate": _diff(got.hidden_states[-2], want.hidden_states[-2])}
    assert len(got.hidden_states) == len(want.hidden_states) == TINY_TEXT["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(got.hidden_states, want.hidden_states)):
        diffs[f"hidden_states[{i}]"] = _diff(a, b)
    if text_case["cls_name"] == "CLIPTextModel":
        diffs["pooler_output"] = _diff(got.pooler_output, want.pooler_output)
        assert got.text_embeds is None
    else:  # transformers' projection output has no pooler: check the pooled state through the text model
        with torch.no_grad():
            inner = text_case["torch"].text_model(
                torch.from_numpy(ids.astype(np.int64)),
                attention_mask=None if mask is None else torch.from_numpy(mask.astype(np.int64)))
        diffs["pooler_output"] = _diff(got.pooler_output, inner.pooler_output)
        diffs["text_embeds"] = _diff(got.text_embeds, want.text_embeds)
    print(text_case["name"], use_mask, {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL, diffs


def test_pooling_rule_is_discriminating():
    """The random ids make the two pooling rules pick different positions, so parity above tests the rule."""
    ids, _ = _random_ids(1000, 2, legacy=True)
    assert (np.argmax(ids, -1) != np.argmax(ids == 2, -1)).all()
    ids, _ = _random_ids(1000, 500, legacy=False)
    assert (np.argmax(ids == 500, -1) == [5, 12, 19]).all()
    assert (np.argmax(ids, -1) != np.argmax(ids == 500, -1)).all()


def test_text_save_pretrained_round_trip(text_case, tmp_path):
    text_case["model"].save_pretrained(tmp_path)
    back = getattr(transformers, text_case["cls_name"]).from_pretrained(str(tmp_path))
    want = text_case["torch"].state_dict()
    got = back.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "hidden_act", "eos_token_id", "projection_dim"):
        assert config[key] == getattr(text_case["torch"].config, key), key
    # and sdjax reads its own files back (the `text_model.` layout every SD checkpoint uses)
    again = getattr(clip, text_case["cls_name"]).from_pretrained(tmp_path)
    ids = jnp.asarray(text_case["ids"], jnp.int32)
    a = text_case["fn"](text_case["model"], ids, None)
    b = text_case["fn"](again, ids, None)
    np.testing.assert_array_equal(np.asarray(a.last_hidden_state), np.asarray(b.last_hidden_state))


def test_text_bfloat16_runs(text_cases):
    text_case = text_cases("sd1_quick_gelu_legacy_eos")
    model = clip.CLIPTextModel.from_pretrained(text_case["folder"], dtype=jnp.bfloat16)
    out = _jit_text(model)(model, jnp.asarray(text_case["ids"], jnp.int32), None)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    ref = text_case["fn"](text_case["model"], jnp.asarray(text_case["ids"], jnp.int32), None)
    err = np.abs(np.asarray(out.last_hidden_state, np.float32) - np.asarray(ref.last_hidden_state)).max()
    assert np.isfinite(err) and err < 0.25, err  # bf16 smoke check, not parity


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint errors


@pytest.fixture(scope="module")
def small_text_dir(tmp_path_factory):
    config = transformers.CLIPTextConfig(**TINY_TEXT, vocab_size=1000, eos_token_id=999, bos_token_id=998)
    return _save(_randomize(transformers.CLIPTextModel(config), seed=7), tmp_path_factory.mktemp("small_text"))


def _edited(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    # the files transformers >= 5 writes have no `text_model.` prefix; use the layout of real SD checkpoints
    tensors = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in tensors.items()}
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_legacy_layout_and_position_ids_buffer_load(small_text_dir, tmp_path):
    def add_buffer(t):
        t["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]

    folder = _edited(small_text_dir, tmp_path / "legacy", add_buffer)
    a = clip.CLIPTextModel.from_pretrained(folder)
    b = clip.CLIPTextModel.from_pretrained(small_text_dir)
    ids = jnp.asarray(_random_ids(1000, 999, False)[0], jnp.int32)
    out = a(ids)  # eager, not jitted
    assert out.hidden_states is None and out.text_embeds is None
    np.testing.assert_array_equal(np.asarray(out.pooler_output), np.asarray(b(ids).pooler_output))


@pytest.mark.parametrize("kind", ["missing", "unexpected", "wrong_shape"])
def test_checkpoint_mismatch_names_the_key(small_text_dir, tmp_path, kind):
    key = {"missing": "text_model.final_layer_norm.bias",
           "unexpected": "text_model.encoder.layers.7.mlp.fc1.weight",
           "wrong_shape": "text_model.embeddings.position_embedding.weight"}[kind]

    def edit(t):
        if kind == "missing":
            del t[key]
        elif kind == "unexpected":
            t[key] = np.zeros((37, 32), np.float32)
        else:
            t[key] = t[key][:76]

    folder = _edited(small_text_dir, tmp_path / kind, edit)
    with pytest.raises(CheckpointMismatchError, match=kind.replace("_", " ")) as err:
        clip.CLIPTextModel.from_pretrained(folder)
    assert key in str(err.value)


def test_projection_checkpoint_into_plain_model_fails(text_cases):
    with pytest.raises(CheckpointMismatchError, match="text_projection.weight"):
        clip.CLIPTextModel.from_pretrained(text_cases("proj_quick_gelu_small_vocab")["folder"])


# ----------------------------------------------------------------------------------------------------------------
# Vision and CLIPModel


def _pixels(batch, seed):
    return torch.randn((batch, 3, 32, 32), generator=torch.Generator().manual_seed(seed))


def _nhwc(pixels):
    return jnp.asarray(pixels.permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def vision_case(request, tmp_path_factory):
    config = transformers.CLIPVisionConfig(**TINY_VISION, hidden_act=request.param)
    torch_model = _randomize(transformers.CLIPVisionModelWithProjection(config), seed=11)
    folder = _save(torch_model, tmp_path_factory.mktemp(f"vision_{request.param}"))
    model = clip.CLIPVisionModelWithProjection.from_pretrained(folder)
    return dict(torch=torch_model, model=model, folder=folder,
                fn=nnx.jit(lambda m, x: m(x, output_hidden_states=True)))


def test_vision_parity(vision_case):
    pixels = _pixels(2, seed=3)
    with torch.no_grad():
        want = vision_case["torch"](pixel_values=pixels, output_hidden_states=True)
        inner = vision_case["torch"].vision_model(pixel_values=pixels)
    got = vision_case["fn"](vision_case["model"], _nhwc(pixels))
    diffs = {"image_embeds": _diff(got.image_embeds, want.image_embeds),
             "last_hidden_state": _diff(got.last_hidden_state, want.last_hidden_state),
             "pooler_output": _diff(got.pooler_output, inner.pooler_output)}
    assert len(got.hidden_states) == len(want.hidden_states)
    for i, (a, b) in enumerate(zip(got.hidden_states, want.hidden_states)):
        diffs[f"hidden_states[{i}]"] = _diff(a, b)
    print({k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL, diffs


def test_vision_round_trip_and_bad_size(vision_case, tmp_path):
    vision_case["model"].save_pretrained(tmp_path)
    back = transformers.CLIPVisionModelWithProjection.from_pretrained(str(tmp_path))
    want = vision_case["torch"].state_dict()
    got = back.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    with pytest.raises(ValueError, match="32x32"):
        vision_case["model"](jnp.zeros((1, 24, 24, 3)))


@pytest.fixture(scope="module")
def clip_case(tmp_path_factory):
    text = transformers.CLIPTextConfig(**TINY_TEXT, vocab_size=1000, eos_token_id=999, bos_token_id=998,
                                       hidden_act="quick_gelu")
    vision = transformers.CLIPVisionConfig(**{**TINY_VISION, "hidden_size": 48, "intermediate_size": 40,
                                              "num_attention_heads": 6}, hidden_act="gelu")
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)
    torch_model = _randomize(transformers.CLIPModel(config), seed=5)
    folder = _save(torch_model, tmp_path_factory.mktemp("clip_model"))
    model = clip.CLIPModel.from_pretrained(folder)
    ids, mask = _random_ids(1000, 999, legacy=False)
    return dict(torch=torch_model, model=model, folder=folder, ids=ids, mask=mask, pixels=_pixels(2, seed=4))


def _features(x):  # transformers >= 5 returns an output object from get_*_features, older versions a tensor
    return x.pooler_output if hasattr(x, "pooler_output") else x


def test_clip_model_parity(clip_case):
    c = clip_case
    ids_t, mask_t = torch.from_numpy(c["ids"]), torch.from_numpy(c["mask"])
    with torch.no_grad():
        want = c["torch"](input_ids=ids_t, pixel_values=c["pixels"], attention_mask=mask_t)
        want_text = _features(c["torch"].get_text_features(input_ids=ids_t, attention_mask=mask_t))
        want_image = _features(c["torch"].get_image_features(pixel_values=c["pixels"]))
    ids, mask, pixels = jnp.asarray(c["ids"], jnp.int32), jnp.asarray(c["mask"]), _nhwc(c["pixels"])
    got = nnx.jit(lambda m, i, p, a: m(i, p, a))(c["model"], ids, pixels, mask)
    got_text = nnx.jit(lambda m, i, a: m.get_text_features(i, a))(c["model"], ids, mask)
    got_image = nnx.jit(lambda m, p: m.get_image_features(p))(c["model"], pixels)
    assert got.logits_per_image.shape == (2, 3)
    logit_diffs = {"logits_per_image": _diff(got.logits_per_image, want.logits_per_image),
                   "logits_per_text": _diff(got.logits_per_text, want.logits_per_text)}
    diffs = {"text_embeds": _diff(got.text_embeds, want.text_embeds),
             "image_embeds": _diff(got.image_embeds, want.image_embeds),
             "get_text_features": _diff(got_text, want_text),
             "get_image_features": _diff(got_image, want_image)}
    print({k: f"{v:.1e}" for k, v in {**diffs, **logit_diffs}.items()})
    assert max(logit_diffs.values()) <= LOGITS_TOL, logit_diffs
    assert max(diffs.values()) <= TOL, diffs


def test_clip_model_round_trip(clip_case, tmp_path):
    clip_case["model"].save_pretrained(tmp_path)
    back = transformers.CLIPModel.from_pretrained(str(tmp_path))
    want = clip_case["torch"].state_dict()
    got = back.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert back.config.projection_dim == 24 and back.config.vision_config.hidden_size == 48
    assert back.config.text_config.eos_token_id == 999


def test_clip_config_legacy_dict_keys():
    d = {"text_config": {"hidden_size": 64}, "text_config_dict": {"hidden_size": 32, "num_attention_heads": 4},
         "vision_config_dict": {"patch_size": 14, "image_size": 224}, "projection_dim": 8}
    config = clip.CLIPConfig.from_dict(d)
    assert config.text_config.hidden_size == 32 and config.vision_config.patch_size == 14
    assert config.vision_config.num_positions == 257
    assert clip.CLIPConfig.from_dict(config.to_dict()) == config


# ----------------------------------------------------------------------------------------------------------------
# Real configs


REAL_CONFIGS = {
    # file: (sdjax class, parameter count)
    "clip_vit_l14_text.json": (clip.CLIPTextModel, 123_060_480),  # SD1.x text_encoder
    "openclip_vit_h14_text.json": (clip.CLIPTextModel, 340_387_840),  # SD2.x text_encoder (23 of 24 layers)
    "openclip_vit_bigg14_text.json": (clip.CLIPTextModelWithProjection, 694_659_840),  # SDXL text_encoder_2
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_config_parses_and_counts(name):
    cls, n_params = REAL_CONFIGS[name]
    raw = json.loads((CONFIGS / name).read_text())
    assert clip.model_class_for(raw) is cls
    config = clip.CLIPTextConfig.from_dict(raw)
    assert clip.CLIPTextConfig.from_dict(config.to_dict()) == config
    assert count_params(cls.abstract(config)) == n_params
    # transformers reads the same file as the same architecture
    hf_config = transformers.CLIPTextConfig.from_dict(raw)
    with torch.device("meta"):
        hf_model = getattr(transformers, cls.__name__)(hf_config)
    assert sum(p.numel() for p in hf_model.parameters()) == n_params
    for key, value in config.to_dict().items():
        if key not in ("model_type", "architectures"):
            assert getattr(hf_config, key) == value, key


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="hidden_act"):
        clip.CLIPTextConfig.from_dict({"hidden_act": "swish"})
    with pytest.raises(ValueError, match="multiple"):
        clip.CLIPTextConfig.from_dict({"hidden_size": 30, "num_attention_heads": 4})
    model = clip.CLIPTextModel.abstract(dict(**TINY_TEXT, vocab_size=100))  # the length check comes first
    with pytest.raises(ValueError, match="at most 77"):
        model(jnp.zeros((1, 78), jnp.int32))
