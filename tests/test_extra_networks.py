"""A1111's `<lora:NAME:WEIGHT>` prompt tags (`sdjax.extra_networks`) against the web UI's own reading of them,
written here from its published code (modules/extra_networks.py: the tag pattern and positional / named arguments;
extensions-builtin/Lora/extra_networks_lora.py: te, unet and their defaults), and the search for the files they
name. The images a tagged prompt gives are tested in tests/test_lora.py (command line against the library's
set_adapters, and those against diffusers)."""
from __future__ import annotations

import re

import pytest

from sdjax.extra_networks import LoraTag, TagError, find_lora, split_tags


def a1111_read(prompt: str):
    """The web UI's reading: (prompt with every tag removed, [(name, te, unet)] of its lora tags in order)."""
    found = []

    def take(m):
        if m.group(1) == "lora":
            positional, named = [], {}
            for item in m.group(2).split(":"):
                parts = item.split("=", 2)
                if len(parts) == 2:
                    named[parts[0]] = parts[1]
                else:
                    positional.append(item)
            te = float(positional[1]) if len(positional) > 1 else 1.0
            te = float(named.get("te", te))
            unet = float(positional[2]) if len(positional) > 2 else te
            unet = float(named.get("unet", unet))
            found.append((positional[0], te, unet))
        return ""

    return re.sub(r"<(\w+):([^>]+)>", take, prompt), found


PROMPTS = [
    "a cat <lora:style:0.7>",
    "<lora:style>a cat",
    "a cat, <lora:style:0.5:1.2>, (sharp:1.1) <lora:detail:-0.5>",
    "a cat <lora:style:te=0.3> and <lora:detail:0.4:unet=0.9>",
    "a cat <lora:my style v2:0.8> <lora:detail:unet=0.2:te=0.6>",
    "no tags, (emphasis:1.2), [a|b], <not a tag> and a > b < c",
    "a cat <lora:style:1e-1:2>BREAK<lora:other:0>",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tags_read_as_the_web_ui_reads_them(prompt):
    text, tags = split_tags(prompt)
    want_text, want = a1111_read(prompt)
    assert text == want_text
    assert [(t.name, t.te, t.unet) for t in tags] == want
    assert all(isinstance(t, LoraTag) for t in tags)


def test_a_lora_named_twice_gets_the_sum_and_lyco_is_lora():
    text, tags = split_tags("a <lora:style:0.5> b <lyco:detail:0.25:0.75> c <lora:style:0.25:1>")
    assert text == "a  b  c "
    assert tags == (LoraTag("style", 0.75, 1.5), LoraTag("detail", 0.25, 0.75))


@pytest.mark.parametrize("prompt,message", [
    ("<lora:style:abc>", "<lora:style:abc>: the text-encoder weight must be a number, got 'abc'"),
    ("<lora:style:1:nan>", "the UNet weight must be a finite number"),
    ("<lora::1>", "no LoRA name"),
    ("<lora:style:1:1:8>", "dyn (a rank cut of DyLoRA files) is not supported"),
    ("<lora:style:dyn=8>", "dyn (a rank cut"),
    ("<lora:style:1:1:1:1>", "too many arguments"),
    ("<lora:style:scale=2>", "unknown argument scale="),
    ("a <hypernet:h:1>", "<hypernet:h:1>: hypernetworks are not supported"),
    ("a <foo:bar>", "unknown extra network 'foo'"),
])
def test_bad_tags_are_one_line_errors(prompt, message):
    with pytest.raises(TagError) as e:
        split_tags(prompt)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_files_are_found_by_name_in_the_folders_and_below(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    style = tmp_path / "a" / "sub" / "style.safetensors"
    style.write_bytes(b"x")
    (tmp_path / "a" / "style.txt").write_bytes(b"x")  # not a LoRA extension
    odd = tmp_path / "b" / "odd [v2]*.pt"
    odd.write_bytes(b"x")
    (tmp_path / "b" / "twice.ckpt").write_bytes(b"x")
    (tmp_path / "a" / "twice.safetensors").write_bytes(b"x")
    dirs = [tmp_path / "a", tmp_path / "b"]
    assert find_lora("style", dirs) == style
    assert find_lora("odd [v2]*", dirs) == odd
    for name, dirs_, message in (("style", [], "give --lora-dir DIR"),
                                 ("nothing", dirs, "<lora:nothing>: no nothing.safetensors/.pt/.ckpt/.bin in"),
                                 ("twice", dirs, "2 files have that name"),
                                 ("style", [tmp_path / "missing"], "no such folder")):
        with pytest.raises(TagError, match=re.escape(message)):
            find_lora(name, dirs_)
