"""CLIP tokenization, as diffusers pipelines do it: BOS, BPE tokens, EOS, padded to 77 with the folder's pad token.

The BPE itself is transformers' `CLIPTokenizer` (transformers is a runtime dependency for this only), read from a
pipeline's `tokenizer/` folder or the packaged one, `PACKAGED` (openai/clip-vit-large-patch14's vocab.json and
merges.txt): the shipped pipeline's `tokenizer/` folder, the one copy of those files that sdjax ships (the
shipped CLIP folder links to it). The pad token differs between folders: SD1.x pads with "<|endoftext|>", the
SD2.x / SDXL `tokenizer_2` folders with "!"; the folder's own config decides.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import warnings
from pathlib import Path

import numpy as np

PACKAGED = Path(__file__).parent / "default_model" / "pipeline" / "tokenizer"
_NO_TORCH = "PyTorch was not found."


class _DropNoTorchNotice(logging.Filter):
    """transformers logs "PyTorch was not found. Models won't be available..." when it is imported without torch,
    which is how sdjax runs: it only needs the tokenizer. Only that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NO_TORCH)


def _import_transformers():
    # the record is logged to transformers' root logger at its first import: the filter must be there before
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _DropNoTorchNotice) for f in logger.filters):
        logger.addFilter(_DropNoTorchNotice())
    import transformers

    return transformers


@dataclasses.dataclass(frozen=True)
class Tokens:
    input_ids: np.ndarray  # (B, max_length) int32
    attention_mask: np.ndarray  # (B, max_length) int32, 1 for real tokens (BOS/EOS included), 0 for padding
    truncated: tuple[str | None, ...]  # per prompt: the text dropped by truncation, or None


class Tokenizer:
    """`tok(prompts, max_length=77) -> (input_ids, attention_mask)`, both (B, max_length) int32 numpy arrays.

    A prompt longer than max_length tokens is cut to max_length - 1 tokens plus EOS, with a warning naming the
    dropped text; `tok.encode(...)` returns the same arrays plus the per-prompt `truncated` text. (The CLIP reranker
    and training captions use this; the pipelines encode prompts of any length in chunks, `sdjax.prompts`, from
    `bpe`.)
    """

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.groups: dict[int, tuple[int, ...]] = {}  # a multi-vector embedding's first id -> all of its ids
        self._original = None  # the tokenizer before its first add_tokens (remove_added_tokens restores it)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, subfolder: str | None = None,
                        pad_token: str | None = None) -> "Tokenizer":
        """A tokenizer folder (vocab.json + merges.txt and/or tokenizer.json, with its configs); None -> the
        packaged CLIP ViT-L/14 files. pad_token: replaces the folder's (OpenCLIP encoders pad with "!"). Never
        touches the network."""
        transformers = _import_transformers()
        folder = PACKAGED if path is None else Path(path).expanduser()
        if subfolder:
            folder = folder / subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such tokenizer folder")
        if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
            raise FileNotFoundError(f"{folder}: no tokenizer.json or vocab.json (is this a CLIP tokenizer folder?)")
        options = {} if pad_token is None else {"pad_token": pad_token}
        return cls(transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **options))

    @property
    def model_max_length(self) -> int:
        return int(self.hf.model_max_length)

    @property
    def pad_token_id(self) -> int:
        return int(self.hf.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def bos_token_id(self) -> int:
        return int(self.hf.bos_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, prompts: str | list[str], max_length: int = 77) -> Tokens:
        """Tokenize, pad to max_length and truncate; see the class docstring."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        enc = self.hf(prompts, padding="max_length", max_length=max_length, truncation=True)
        # verbose=False: this pass is for the report; it must not warn about its own length
        full = self.hf(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
        truncated = []
        for prompt, ids in zip(prompts, full):
            if len(ids) <= max_length:
                truncated.append(None)
                continue
            # kept: BOS + max_length - 2 tokens + EOS; dropped: the rest before the EOS
            dropped = self.hf.decode(ids[max_length - 1:-1])
            truncated.append(dropped)
            warnings.warn(
                f"prompt truncated to {max_length} tokens (CLIP's limit); dropped: {dropped!r} "
                f"(from {prompt[:40]!r}...)",
                stacklevel=2,
            )
        return Tokens(
            np.asarray(enc["input_ids"], np.int32),
            np.asarray(enc["attention_mask"], np.int32),
            tuple(truncated),
        )

    def __call__(self, prompts: str | list[str], max_length: int = 77) -> tuple[np.ndarray, np.ndarray]:
        tokens = self.encode(prompts, max_length)
        return tokens.input_ids, tokens.attention_mask

    def bpe(self, texts: list[str]) -> list[list[int]]:
        """The BPE ids of each text, without BOS/EOS, padding or truncation (`sdjax.prompts` makes the chunks); a
        multi-vector embedding's token gives all of its ids (see `add_tokens`)."""
        return [[i for group in groups for i in group] for groups in self.bpe_groups(texts)]

    def bpe_groups(self, texts: list[str]) -> list[list[tuple[int, ...]]]:
        """As `bpe`, each id a group of its own except a multi-vector embedding's ids, one group (a prompt chunk
        keeps them together, as A1111 does)."""
        out = self.hf(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return [[self.groups.get(i, (i,)) for i in ids] for ids in out]

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add new vocabulary entries, one after the other as diffusers' `load_textual_inversion` adds them, and
        return their ids (the first is len(self) before the call). ValueError, naming it, for a token already in
        the vocabulary. The text then tokenizes to these ids wherever a token occurs in it (transformers' added
        tokens)."""
        vocab = self.hf.get_vocab()
        for token in tokens:
            if not isinstance(token, str) or not token.strip():
                raise ValueError(f"a token must be a non-empty string, got {token!r}")
            if token in vocab:
                raise ValueError(f"token {token!r} is already in the tokenizer's vocabulary: choose another token")
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"tokens {tokens} repeat a token")
        if self._original is None:
            self._original = copy.deepcopy(self.hf)
        ids = []
        for token in tokens:
            self.hf.add_tokens(token)
            ids.append(int(self.hf.convert_tokens_to_ids(token)))
        return ids

    def group_tokens(self, ids: list[int]) -> None:
        """Make ids[0] stand for all of `ids` (a multi-vector embedding: its token expands to its N tokens, as
        diffusers' `maybe_convert_prompt` does)."""
        self.groups[int(ids[0])] = tuple(int(i) for i in ids)

    def remove_added_tokens(self) -> None:
        """Undo every `add_tokens` and `group_tokens`: the tokenizer as it was loaded."""
        if self._original is not None:
            self.hf = copy.deepcopy(self._original)
        self.groups = {}

    def token_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (e.g. ",</w>"), or None."""
        return self.hf.get_vocab().get(token)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


__all__ = ["PACKAGED", "Tokenizer", "Tokens"]
