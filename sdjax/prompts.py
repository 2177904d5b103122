"""Prompts of any length, and A1111's attention syntax, as token chunks (numpy only; the encoding is the families').

A prompt is tokenized into chunks of `CHUNK` (75) tokens; each chunk becomes [BOS] + 75 tokens + [EOS], padded as
the model's tokenizer pads (CLIP-L: EOS; OpenCLIP, the SD2 / SDXL `tokenizer_2` folders: "!" after the first EOS),
and goes through the text encoder on its own; the chunks' states are concatenated along the token axis (77 * k).
A prompt of at most 75 tokens is one chunk: exactly the tokens diffusers makes.

prompt_syntax:
- "plain": the text is literal; chunks are consecutive runs of 75 tokens.
- "a1111": AUTOMATIC1111's attention syntax. `(x)` multiplies the weight of x's tokens by 1.1, `[x]` divides it by
  1.1, `(x:1.3)` sets the factor, nesting multiplies; `\\(`, `\\)`, `\\[`, `\\]` are literal brackets; `BREAK` ends
  the chunk. Each parsed fragment is tokenized on its own. When a chunk fills and a comma is among its last
  `COMMA_BACKTRACK` tokens, the tokens after the comma move to the next chunk. The family multiplies each chunk's
  encoded states by the token weights and (emphasis "original", A1111's default) rescales the chunk to keep its
  mean; emphasis "none" only multiplies.

A textual-inversion embedding of N vectors (its token stands for N ids, `Tokenizer.group_tokens`) is never split:
when its vectors do not fit in the current chunk they start the next one (A1111), in both syntaxes; an emphasis
weight applies to all N.

The number of chunks is a shape of the compiled program: a batch is padded to `chunk_bucket` chunks with empty
chunks, which `context_mask` marks so that the UNet's cross-attention ignores them (an image never depends on the
prompts it shares a batch with).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

CHUNK = 75  # tokens per chunk, BOS and EOS not counted
LENGTH = CHUNK + 2  # CLIP's 77 positions
SYNTAXES = ("plain", "a1111")
EMPHASES = ("original", "none")
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = ("BREAK", -1.0)  # the fragment that ends a chunk (A1111's marker)

# one token of the syntax per match: an escape, a bracket, a ":weight)" closer, a run of text, or a lone colon
_SYNTAX = re.compile(r"""
    (?P<escape>\\[()\[\]\\]?)
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def check_syntax(prompt_syntax: str, emphasis: str = "original") -> None:
    if prompt_syntax not in SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {', '.join(SYNTAXES)}, got {prompt_syntax!r}")
    if emphasis not in EMPHASES:
        raise ValueError(f"emphasis must be one of {', '.join(EMPHASES)}, got {emphasis!r}")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A1111 prompt -> [(text, weight), ...], `BREAK` as the fragment ("BREAK", -1.0); neighbours of equal weight
    are merged. As A1111: unclosed brackets apply to the end of the prompt; a closer without its opener, and
    `:w)` outside round brackets, are text. Unlike A1111, a BREAK inside brackets still ends the chunk."""
    parts: list[list] = []  # [text, weight] (lists: weights are multiplied in place)
    opened = {"(": [], "[": []}  # start index into parts of each open bracket

    def scale(start, factor):
        for part in parts[start:]:
            if tuple(part) != BREAK:
                part[1] *= factor

    for m in _SYNTAX.finditer(text):
        if m.group("escape") is not None:
            parts.append([m.group("escape")[1:], 1.0])
        elif m.group("open"):
            opened[m.group("open")].append(len(parts))
        elif m.group("weight") is not None and opened["("]:
            scale(opened["("].pop(), float(m.group("weight")))
        elif m.group("close") == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif m.group("close") == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE)
        else:  # text, or a closer / ":w)" with nothing open
            pieces = _BREAK.split(m.group(0))
            for i, piece in enumerate(pieces):
                if i:
                    parts.append(list(BREAK))
                parts.append([piece, 1.0])
    for start in opened["("]:
        scale(start, ROUND)
    for start in opened["["]:
        scale(start, SQUARE)
    merged: list[list] = []
    for part in parts or [["", 1.0]]:
        if merged and tuple(part) != BREAK and tuple(merged[-1]) != BREAK and merged[-1][1] == part[1]:
            merged[-1][0] += part[0]
        else:
            merged.append(list(part))
    return [(t, float(w)) for t, w in merged]


@dataclasses.dataclass(frozen=True)
class PromptChunks:
    """One prompt for one tokenizer: ids and per-token weights, both (k, 77); k >= 1 chunks."""

    ids: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _finish(tokenizer, chunks: list[tuple[list, list]]) -> PromptChunks:
    ids = np.full((len(chunks), LENGTH), tokenizer.pad_token_id, np.int32)
    weights = np.ones((len(chunks), LENGTH), np.float32)
    for i, (tokens, ws) in enumerate(chunks):
        ids[i, 0] = tokenizer.bos_token_id
        ids[i, 1:len(tokens) + 1] = tokens
        ids[i, len(tokens) + 1] = tokenizer.eos_token_id
        weights[i, 1:len(ws) + 1] = ws
    return PromptChunks(ids, weights)


def plain_text(text: str, prompt_syntax: str = "plain") -> str:
    """The words of a prompt without its syntax (a1111: brackets, weights and BREAKs gone; plain: as it is), e.g.
    for a CLIP reranker, which reads text literally."""
    if prompt_syntax == "plain":
        return text
    parts = [t if (t, w) != BREAK else " " for t, w in parse_attention(text)]
    return " ".join("".join(parts).split())


def prompt_chunks(tokenizer, text: str, prompt_syntax: str = "plain") -> PromptChunks:
    """The chunks of one prompt (see the module docstring). tokenizer: a `sdjax.tokenizer.Tokenizer`."""
    if prompt_syntax == "plain":
        runs = [[]]
        for group in tokenizer.bpe_groups([text])[0]:
            if len(runs[-1]) + len(group) > CHUNK:  # an embedding's vectors stay in one chunk
                runs.append([])
            runs[-1].extend(group)
        return _finish(tokenizer, [(run, [1.0] * len(run)) for run in runs])
    check_syntax(prompt_syntax)
    fragments = parse_attention(text)
    texts = [t for t, w in fragments if (t, w) != BREAK]
    tokenized = iter(tokenizer.bpe_groups(texts) if texts else [])
    comma = tokenizer.token_id(",</w>")
    chunks: list[tuple[list, list]] = []
    tokens: list[int] = []
    weights: list[float] = []
    comma_at = -1  # index in `tokens` of the last comma of the current chunk

    def close():
        nonlocal tokens, weights, comma_at
        chunks.append((tokens, weights))
        tokens, weights, comma_at = [], [], -1

    for fragment, weight in fragments:
        if (fragment, weight) == BREAK:
            close()
            continue
        for group in next(tokenized):
            if group == (comma,):
                comma_at = len(tokens)  # (a comma that opens a new chunk below is not remembered, as A1111)
            elif len(tokens) == CHUNK and comma_at != -1 and CHUNK - comma_at <= COMMA_BACKTRACK:
                # the chunk is full: the words after its last comma start the next chunk
                moved = tokens[comma_at + 1:], weights[comma_at + 1:]
                tokens, weights = tokens[:comma_at + 1], weights[:comma_at + 1]
                close()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == CHUNK or len(tokens) + len(group) > CHUNK:
                close()  # full, or too full for all of an embedding's vectors (A1111 moves them on together)
            tokens.extend(group)
            weights.extend([weight] * len(group))
    if tokens or not chunks:
        close()
    return _finish(tokenizer, chunks)


def chunk_bucket(n: int) -> int:
    """The padded chunk count of a batch whose longest prompt has n chunks: 1, 2, 3, 4, then multiples of 4."""
    return n if n <= 4 else -(-n // 4) * 4


def pad_chunks(tokenizer, prompts: list[PromptChunks], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights), each (B, k, 77): every prompt filled up to k chunks with empty chunks (BOS, EOS, padding)
    of weight 1."""
    empty = _finish(tokenizer, [([], [])])
    ids = np.repeat(empty.ids[None], len(prompts), axis=0).repeat(k, axis=1)
    weights = np.ones(ids.shape, np.float32)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p.ids
        weights[b, :len(p)] = p.weights
    return ids, weights


def context_mask(counts, k: int) -> np.ndarray:
    """(B, 77 k) bool: True at the token positions of each prompt's first counts[b] chunks (the real ones)."""
    counts = np.asarray(counts)
    return np.repeat(np.arange(k)[None, :] < counts[:, None], LENGTH, axis=1)


def text_inputs(groups: dict, prompt_syntax: str = "plain", emphasis: str = "original") -> tuple[dict, tuple]:
    """A family's host arrays for one call. groups: prefix ("" for the prompts, "neg_" for the negatives) -> one
    (tokenizer, texts) per text encoder j. Returns (arrays, static):
    `{prefix}ids_{j}` (B, k, 77) int32; with "a1111", `{prefix}weights_{j}` (B, k, 77) float32; when k > 1,
    `{prefix}mask` (B, 77 k) bool (a prompt's real chunks: the most any of its encoders' texts needs).
    k = chunk_bucket of the longest text in the call, so that prompts and negatives line up. static:
    (("chunks", k), ("emphasis", emphasis or None for plain)), the part of the program's plan the text fixes."""
    check_syntax(prompt_syntax, emphasis)
    chunked = {prefix: [(t, [prompt_chunks(t, text, prompt_syntax) for text in texts]) for t, texts in encoders]
               for prefix, encoders in groups.items()}
    counts = {prefix: np.max([[len(c) for c in cs] for _, cs in encoders], axis=0)
              for prefix, encoders in chunked.items()}
    k = chunk_bucket(int(max(c.max() for c in counts.values())))
    arrays = {}
    for prefix, encoders in chunked.items():
        for j, (t, cs) in enumerate(encoders):
            ids, weights = pad_chunks(t, cs, k)
            arrays[f"{prefix}ids_{j}"] = ids
            if prompt_syntax == "a1111":
                arrays[f"{prefix}weights_{j}"] = weights
        if k > 1:
            arrays[f"{prefix}mask"] = context_mask(counts[prefix], k)
    return arrays, (("chunks", k), ("emphasis", emphasis if prompt_syntax == "a1111" else None))


__all__ = ["BREAK", "CHUNK", "COMMA_BACKTRACK", "EMPHASES", "LENGTH", "PromptChunks", "SYNTAXES", "check_syntax",
           "chunk_bucket", "context_mask", "pad_chunks", "parse_attention", "plain_text", "prompt_chunks",
           "text_inputs"]
