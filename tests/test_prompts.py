"""sdjax.prompts: A1111's attention syntax, chunks of 75 tokens, padding, comma back-tracking, buckets, masks.

The expected fragments of the parser are A1111's own documented examples (modules/prompt_parser.py doctests)."""
from __future__ import annotations

import numpy as np
import pytest

from sdjax import prompts
from sdjax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained()


@pytest.fixture(scope="module")
def tok_bang():
    return Tokenizer.from_pretrained(pad_token="!")


@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("[[faint]] (x:0.5)", [("faint", 1 / 1.1 ** 2), (" ", 1.0), ("x", 0.5)]),
    ("stray) closer] and :1.5) colon", [("stray) closer] and :1.5) colon", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(a BREAK b:2)", [("a", 2.0), ("BREAK", -1.0), ("b", 2.0)]),
    ("", [("", 1.0)]),
])
def test_parse_attention(text, expected):
    got = prompts.parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12)


def test_short_plain_prompt_is_diffusers_tokens(tok, tok_bang):
    for t in (tok, tok_bang):
        for text in ("a red circle on a blue background", ""):
            chunks = prompts.prompt_chunks(t, text, "plain")
            assert chunks.ids.shape == (1, 77)
            assert np.array_equal(chunks.ids[0], t([text])[0][0])
            assert np.all(chunks.weights == 1.0)
    # "!" padding after the first EOS
    ids = prompts.prompt_chunks(tok_bang, "a cat", "plain").ids[0]
    assert ids[3] == tok_bang.eos_token_id and np.all(ids[4:] == tok_bang.token_id("!"))


def test_long_prompts_chunk_by_75(tok):
    text = " ".join(["cat"] * 80)  # 80 tokens
    chunks = prompts.prompt_chunks(tok, text, "plain")
    cat = tok.token_id("cat</w>")
    assert chunks.ids.shape == (2, 77)
    assert chunks.ids[0, 0] == tok.bos_token_id and np.all(chunks.ids[0, 1:76] == cat)
    assert chunks.ids[0, 76] == tok.eos_token_id
    assert np.all(chunks.ids[1, 1:6] == cat) and np.all(chunks.ids[1, 6:] == tok.eos_token_id)
    assert len(prompts.prompt_chunks(tok, " ".join(["cat"] * 75), "plain")) == 1
    assert len(prompts.prompt_chunks(tok, " ".join(["cat"] * 151), "a1111")) == 3
    # plain: brackets, BREAK and commas are text
    plain = prompts.prompt_chunks(tok, "(a BREAK b:1.5)", "plain")
    assert np.array_equal(plain.ids[0], tok(["(a BREAK b:1.5)"])[0][0])


def test_weights_break_and_escapes(tok):
    chunks = prompts.prompt_chunks(tok, "a (red:1.5) [cat] BREAK \\(dog\\)", "a1111")
    assert chunks.ids.shape == (2, 77)
    red, cat = tok.token_id("red</w>"), tok.token_id("cat</w>")
    row = list(chunks.ids[0])
    assert chunks.weights[0, row.index(red)] == np.float32(1.5)
    assert chunks.weights[0, row.index(cat)] == np.float32(1 / 1.1)
    assert np.array_equal(chunks.ids[1][:5], [tok.bos_token_id, *tok.bpe(["(dog)"])[0], tok.eos_token_id])
    assert np.all(chunks.weights[1] == 1.0)
    # a BREAK at the start gives an empty chunk first, as A1111
    assert len(prompts.prompt_chunks(tok, "BREAK a", "a1111")) == 2


def test_comma_backtrack(tok):
    cat, dog, comma = (tok.token_id(t) for t in ("cat</w>", "dog</w>", ",</w>"))
    text = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)  # comma at index 70, chunk full at 75
    chunks = prompts.prompt_chunks(tok, text, "a1111")
    assert chunks.ids.shape == (2, 77)
    assert chunks.ids[0, 71] == comma and chunks.ids[0, 72] == tok.eos_token_id  # the dogs moved on
    assert np.all(chunks.ids[1, 1:11] == dog) and chunks.ids[1, 11] == tok.eos_token_id
    # a comma further back than 20 tokens: no back-tracking
    text = " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30)
    chunks = prompts.prompt_chunks(tok, text, "a1111")
    assert np.all(chunks.ids[0, 52:76] == dog) and np.all(chunks.ids[1, 1:7] == dog)
    # plain never back-tracks
    text = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    assert np.all(prompts.prompt_chunks(tok, text, "plain").ids[0, 72:76] == dog)


def test_buckets_padding_and_masks(tok):
    assert [prompts.chunk_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 13)] == [1, 2, 3, 4, 8, 8, 12, 16]
    short = prompts.prompt_chunks(tok, "a cat", "a1111")
    long = prompts.prompt_chunks(tok, " ".join(["cat"] * 100), "a1111")
    ids, weights = prompts.pad_chunks(tok, [short, long], 3)
    assert ids.shape == weights.shape == (2, 3, 77)
    assert np.array_equal(ids[0, 0], short.ids[0]) and np.array_equal(ids[1, :2], long.ids)
    empty = prompts.prompt_chunks(tok, "", "plain").ids[0]
    assert np.array_equal(ids[0, 1], empty) and np.array_equal(ids[0, 2], empty) and np.array_equal(ids[1, 2], empty)
    mask = prompts.context_mask([1, 2], 3)
    assert mask.shape == (2, 231) and mask[0].sum() == 77 and mask[1].sum() == 154 and mask[1, :154].all()


def test_bad_syntax():
    with pytest.raises(ValueError, match="prompt_syntax"):
        prompts.check_syntax("compel")
    with pytest.raises(ValueError, match="emphasis"):
        prompts.check_syntax("a1111", "sqrt")


@pytest.mark.parametrize("path", ["whole", "query_chunk", "cpu_chunks"])
def test_attention_mask(path, monkeypatch):
    """A mask of all True is bit-identical to none (existing parity stays exact); masked keys are the same as
    keys left out, in each of `attention`'s three code paths."""
    import jax
    import jax.numpy as jnp

    from sdjax.models import cpu_lowering, layers

    if path == "cpu_chunks":
        monkeypatch.setattr(cpu_lowering, "SCORES_WHOLE", 1)
        monkeypatch.setattr(cpu_lowering, "SCORES_PER_CHUNK", 16 * 154)  # 3 chunks of 16 queries
    chunk = 16 if path == "query_chunk" else None
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 40, 8), (2, 154, 8), (2, 154, 8)))
    run = jax.jit(lambda q, k, v, m: layers.attention(q, k, v, 2, query_chunk=chunk, mask=m))
    plain = jax.jit(lambda q, k, v: layers.attention(q, k, v, 2, query_chunk=chunk))
    assert np.array_equal(np.asarray(run(q, k, v, jnp.ones((2, 154), bool))), np.asarray(plain(q, k, v)))
    mask = jnp.asarray(prompts.context_mask([1, 2], 2))
    out = np.asarray(run(q, k, v, mask))
    np.testing.assert_allclose(out[:1], np.asarray(plain(q[:1], k[:1, :77], v[:1, :77])), atol=1e-6)
    np.testing.assert_allclose(out[1:], np.asarray(plain(q[1:], k[1:], v[1:])), atol=1e-6)
    assert np.abs(out[:1] - np.asarray(plain(q[:1], k[:1], v[:1]))).max() > 1e-2


def test_plain_text():
    assert prompts.plain_text("a (red:1.3) [[fox]] BREAK \\(1990\\)", "a1111") == "a red fox (1990)"
    assert prompts.plain_text("a (red:1.3)", "plain") == "a (red:1.3)"
