"""Textual-inversion embeddings in a pipeline: `load_textual_inversion` and `unload_textual_inversion`, with diffusers'
names and meaning, for every family (`DiffusionPipeline` mixes this in).

An embedding of N vectors loaded for a text encoder adds N tokens to that encoder's tokenizer ("tok", "tok_1", ...,
as diffusers names them) and N rows to the encoder's token-embedding table; the tokenizer then reads "tok" in a prompt
as all N ids, kept together in one prompt chunk (`sdjax.prompts`).

Compiles: the table is an argument of the compiled generation program, so its row count is one of the program's
shapes. It grows in buckets (room for 64 added tokens past the tokenizer's own, then 128, 256, ...) and never
shrinks: the first embedding costs one new compile, later ones and unloading none; their rows are written into the
table in place by a small jitted update.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import embeddings as embeddings_lib
from sdjax.pipelines.folder import tokenizer_of
from sdjax.pipelines.program import put_batch
from sdjax.prompts import CHUNK

ROOM = 64  # the first bucket of added rows; then doubled
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # which vectors of an SDXL file go where


@dataclasses.dataclass(frozen=True)
class LoadedToken:
    """An embedding loaded for one text encoder: its tokens' names and ids, and its vectors (N, D) float32."""

    encoder: str
    names: tuple[str, ...]
    ids: tuple[int, ...]
    vectors: np.ndarray


@dataclasses.dataclass
class EncoderTable:
    """What an encoder's table looked like before any embedding: `start` is the first row an embedding may use (the
    tokenizer's length then, at most the table's rows)."""

    base_rows: int
    start: int


def _tokens(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} ({len(names)} vectors)"


@functools.lru_cache(maxsize=None)
def _rewriter(rows: int, start: int, sharding):
    """A jitted (table, extra) -> the table grown to `rows` rows (zeros) with rows start.. replaced by `extra`; one
    per table shape, so rewriting rows of the same shape compiles nothing new."""

    def rewrite(table, extra):
        if rows > table.shape[0]:
            table = jnp.concatenate([table, jnp.zeros((rows - table.shape[0], table.shape[1]), table.dtype)])
        return jax.lax.dynamic_update_slice(table, extra.astype(table.dtype), (start, 0))

    return jax.jit(rewrite, out_shardings=sharding)


class TextualInversionMixin:
    """`load_textual_inversion` / `unload_textual_inversion` for a `DiffusionPipeline`: its `text_encoders()` (name ->
    CLIP module), tokenizers named as diffusers names them (text_encoder -> tokenizer, text_encoder_2 ->
    tokenizer_2), its replicated sharding and its cache of compiled programs."""

    def load_textual_inversion(self, pretrained_model_name_or_path, token: str | list[str] | None = None,
                               tokenizer=None, text_encoder=None, *, weight_name: str | None = None) -> None:
        """Load textual-inversion embeddings, as diffusers' `load_textual_inversion`.

        pretrained_model_name_or_path: a file (A1111 `.pt` with `string_to_param`, kohya `.safetensors` with
        `emb_params`, diffusers `learned_embeds.bin/.safetensors` `{token: tensor}`, SDXL `.safetensors` with
        `clip_l`/`clip_g`), a folder holding `learned_embeds.*` (or `weight_name`), a dict of that shape, an array
        (N, D) (then `token` is needed), an `sdjax.embeddings.Embedding`, or a list of these.
        token: the token prompts use (a list: one per source). Default: the one the file names (A1111 `name`, the
        diffusers key), else the file name without its extension. With one array of N rows and a list of N tokens,
        each row is a token of its own (diffusers).
        text_encoder / tokenizer: the pipeline's own (e.g. `pipe.text_encoder_2, pipe.tokenizer_2`) to load into that
        encoder only. Default: SDXL files go to both SDXL encoders (clip_l -> text_encoder, clip_g -> text_encoder_2;
        a refiner takes clip_g), other embeddings to the first text encoder (the refiner's: text_encoder_2).

        An embedding of N > 1 vectors becomes tokens "tok", "tok_1", ..., "tok_{N-1}"; "tok" in a prompt stands for
        all of them. Errors (one line, nothing loaded): a token already in the vocabulary, an embedding whose width
        is not the encoder's, a file with no embedding, more than 75 vectors.
        """
        sources = list(pretrained_model_name_or_path) if isinstance(pretrained_model_name_or_path, (list, tuple)) \
            else [pretrained_model_name_or_path]
        tokens = list(token) if isinstance(token, (list, tuple)) else [token]
        if not sources:
            raise ValueError("load_textual_inversion: no embedding given")
        if tokens == [None]:
            tokens = tokens * len(sources)
        target = self._ti_target(tokenizer, text_encoder)
        if len(sources) == 1 and len(tokens) > 1 and not isinstance(
                sources[0], (dict, str, os.PathLike, embeddings_lib.Embedding)):
            # one array of rows, one token per row (diffusers)
            rows = embeddings_lib.from_tree(sources[0], "the embedding").vectors
            if len(rows) != len(tokens):
                raise ValueError(f"the embedding has {len(rows)} vectors but {len(tokens)} tokens were given: give one "
                                 "token per vector")
            found = [(embeddings_lib.Embedding(f"row {i}", vectors=row[None]), t)
                     for i, (row, t) in enumerate(zip(rows, tokens))]
        else:
            if len(tokens) != len(sources):
                raise ValueError(f"{len(sources)} embeddings but {len(tokens)} tokens: give one token per embedding")
            found = [(self._ti_read(source, i, weight_name), t) for i, (source, t) in enumerate(zip(sources, tokens))]
        named = [t for t in tokens if t is not None]
        if len(set(named)) != len(named):
            raise ValueError(f"tokens {named} repeat a token")

        # every check before anything changes: a failed call loads nothing
        plan: list[tuple[str, tuple[str, ...], np.ndarray]] = []
        for embedding, tok in found:
            tok = tok or embedding.name or embedding.stem
            if not tok:
                raise ValueError(f"{embedding.source}: it names no token: pass token=")
            if not isinstance(tok, str) or not tok.strip():
                raise ValueError(f"a token must be a non-empty string, got {tok!r}")
            for name, vectors in self._ti_vectors(embedding, target).items():
                n = len(vectors)
                width = self.text_encoders()[name].config.hidden_size
                if vectors.shape[1] != width:
                    raise ValueError(f"{embedding.source}: embedding width {vectors.shape[1]} does not fit {name} "
                                     f"(width {width}){self._ti_hint(embedding, name)}")
                if n > CHUNK:
                    raise ValueError(f"{embedding.source}: {n} vectors; at most {CHUNK} fit in a prompt chunk")
                names = (tok,) + tuple(f"{tok}_{i}" for i in range(1, n))
                for t in names:
                    if self._ti_tokenizer(name).token_id(t) is not None or any(
                            t in other for enc, other, _ in plan if enc == name):
                        raise ValueError(f"token {t!r} is already in {self._ti_tokenizer_name(name)}'s vocabulary: "
                                         "choose another token (token=) or unload it first")
                plan.append((name, names, vectors))

        for name in {name for name, _, _ in plan}:
            table = self.text_encoders()[name].text_model.embeddings.token_embedding.embedding.get_value()
            if isinstance(table, jax.ShapeDtypeStruct):
                raise ValueError("this pipeline has shapes only (no weights): it cannot load embeddings")
        for name, names, vectors in plan:
            self._ti_add(name, names, vectors)
        self._ti_write({name for name, _, _ in plan})

    def unload_textual_inversion(self, tokens: str | list[str] | None = None, tokenizer=None,
                                 text_encoder=None) -> None:
        """Remove loaded embeddings: `tokens` (their names; a multi-vector embedding goes whole), or all of them;
        from the given text encoder only, or from every one. The tokenizers are back to their loaded state except for
        the embeddings that stay (their ids are renumbered, as diffusers does). Never recompiles."""
        loaded = self._ti_loaded()
        only = None if tokenizer is None and text_encoder is None else self._ti_target(tokenizer, text_encoder)
        scope = [e for e in loaded if only is None or e.encoder == only]
        if tokens is None:
            removed = scope
        else:
            wanted = [tokens] if isinstance(tokens, str) else list(tokens)
            removed = [e for e in scope if set(e.names) & set(wanted)]
            missing = [t for t in wanted if not any(t in e.names for e in removed)]
            if missing:
                raise ValueError(f"no textual-inversion token {missing[0]!r} is loaded"
                                 + (f" in {only}" if only else ""))
        if not removed:
            return
        touched = {e.encoder for e in removed}
        keep = [e for e in loaded if not any(e is r for r in removed)]
        self._ti_state = [e for e in keep if e.encoder not in touched]
        for name in sorted(touched):
            self._ti_tokenizer(name).remove_added_tokens()
        for e in keep:
            if e.encoder in touched:
                self._ti_add(e.encoder, e.names, e.vectors)
        self._ti_write(touched)

    # -- helpers ----------------------------------------------------------------------------------------------------

    def _ti_loaded(self) -> list[LoadedToken]:
        if not hasattr(self, "_ti_state"):
            self._ti_state: list[LoadedToken] = []
            self._ti_tables: dict[str, EncoderTable] = {}
        return self._ti_state

    @staticmethod
    def _ti_tokenizer_name(encoder: str) -> str:
        return tokenizer_of(encoder)

    def _ti_tokenizer(self, encoder: str):
        return getattr(self, self._ti_tokenizer_name(encoder))

    def _ti_target(self, tokenizer, text_encoder) -> str | None:
        """The name of the encoder given as text_encoder= and/or tokenizer= (None: none given)."""
        if tokenizer is None and text_encoder is None:
            return None
        names = list(self.text_encoders())
        by_module = [n for n in names if self.text_encoders()[n] is text_encoder]
        by_tokenizer = [n for n in names if self._ti_tokenizer(n) is tokenizer]
        if text_encoder is not None and not by_module:
            raise ValueError(f"text_encoder must be one of this pipeline's text encoders ({', '.join(names)})")
        if tokenizer is not None and not by_tokenizer:
            raise ValueError(f"tokenizer must be one of this pipeline's tokenizers "
                             f"({', '.join(self._ti_tokenizer_name(n) for n in names)})")
        if by_module and by_tokenizer and by_module != by_tokenizer:
            raise ValueError(f"text_encoder is {by_module[0]} but tokenizer is "
                             f"{self._ti_tokenizer_name(by_tokenizer[0])}: give the encoder's own tokenizer")
        return (by_module or by_tokenizer)[0]

    @staticmethod
    def _ti_read(source: Any, index: int, weight_name: str | None) -> embeddings_lib.Embedding:
        if isinstance(source, embeddings_lib.Embedding):  # already read (`sdjax.embeddings.read_embedding`)
            return source
        if isinstance(source, (str, os.PathLike)):
            return embeddings_lib.read_embedding(source, weight_name)
        return embeddings_lib.from_tree(source, f"embedding {index}" if index else "the embedding")

    def _ti_vectors(self, embedding: embeddings_lib.Embedding, target: str | None) -> dict[str, np.ndarray]:
        """encoder name -> the vectors it gets."""
        names = list(self.text_encoders())
        if not embedding.is_sdxl:
            return {target or names[0]: embedding.vectors}
        if target is not None:
            if target not in SDXL_KEYS:
                raise ValueError(f"{embedding.source}: an SDXL embedding has no vectors for {target}")
            return {target: getattr(embedding, SDXL_KEYS[target])}
        if "text_encoder_2" not in names:
            raise ValueError(f"{embedding.source}: an SDXL embedding (clip_l/clip_g) needs an SDXL pipeline; pass "
                             "its clip_l with text_encoder= to load it into this one")
        return {n: getattr(embedding, SDXL_KEYS[n]) for n in names if n in SDXL_KEYS}

    def _ti_hint(self, embedding: embeddings_lib.Embedding, name: str) -> str:
        """Which of this pipeline's encoders the embedding would fit, for the error message."""
        width = embedding.vectors.shape[1] if not embedding.is_sdxl else None
        fits = [n for n, m in self.text_encoders().items() if m.config.hidden_size == width and n != name]
        if fits:
            return (f"; it fits {fits[0]}: pass text_encoder=pipe.{fits[0]}, "
                    f"tokenizer=pipe.{self._ti_tokenizer_name(fits[0])}")
        return ": it was made for another model"

    def _ti_add(self, encoder: str, names: tuple[str, ...], vectors: np.ndarray) -> None:
        tokenizer = self._ti_tokenizer(encoder)
        self._ti_loaded()
        tables = self._ti_tables
        if encoder not in tables:
            rows = self.text_encoders()[encoder].text_model.embeddings.token_embedding.num_embeddings
            tables[encoder] = EncoderTable(base_rows=rows, start=min(rows, tokenizer.vocab_size))
        ids = tuple(tokenizer.add_tokens(list(names)))
        if len(ids) > 1:
            tokenizer.group_tokens(list(ids))
        self._ti_state.append(LoadedToken(encoder, names, ids, vectors))

    def _ti_base_rows(self) -> dict[str, int]:
        """encoder -> its token table's rows before any embedding, for the tables embeddings have grown."""
        self._ti_loaded()
        return {name: info.base_rows for name, info in self._ti_tables.items()
                if self.text_encoders()[name].config.vocab_size != info.base_rows}

    def _ti_write(self, encoders) -> None:
        """Write the loaded rows of each encoder into its table (grown to the next bucket if they do not fit)."""
        for name in sorted(encoders):
            module = self.text_encoders()[name]
            embed = module.text_model.embeddings.token_embedding
            table = embed.embedding.get_value()
            info = self._ti_tables[name]
            loaded = [e for e in self._ti_state if e.encoder == name]
            needed = max([i + 1 for e in loaded for i in e.ids], default=0)
            rows = max(table.shape[0], info.base_rows)
            if needed > rows:
                room = ROOM
                while info.start + room < needed:
                    room *= 2
                rows = max(rows, info.start + room)
            extra = np.zeros((rows - info.start, table.shape[1]), np.float32)
            for e in loaded:
                extra[np.asarray(e.ids) - info.start] = e.vectors
            write = _rewriter(rows, info.start, self._replicated)
            embed.embedding.set_value(write(table, put_batch(extra, self._replicated)))
            if rows != embed.num_embeddings:  # a new shape: the compiled programs are for the old one
                embed.num_embeddings = rows
                module.config = dataclasses.replace(module.config, vocab_size=rows)
                self._programs.clear()


__all__ = ["EncoderTable", "LoadedToken", "ROOM", "TextualInversionMixin"]
