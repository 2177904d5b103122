"""Prompt-following accuracy of the shipped (or a given) shapes model on the held-out combinations.

    python bench/eval_tiny.py [--ckpt PIPELINE] [--rerank-model CLIP] [--json out.json] [--save-images DIR]

The same as `sdjax eval-tiny` (both call `sdjax.evaluate.evaluate_tiny`); prints a Markdown table.
"""
from __future__ import annotations

import sys

from sdjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval-tiny", *sys.argv[1:]]))
