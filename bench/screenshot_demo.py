"""Screenshot of the Gradio demo for docs/demo.png, with headless Chromium (`apt-get install -y chromium`).

    python bench/screenshot_demo.py [--ckpt PATH] [--rerank-model PATH] [--prompt TEXT] [--out docs/demo.png]

Starts `sdjax demo` in this process on a free 127.0.0.1 port, fills the page once on load with a generation for
--prompt (so the gallery and metadata are visible), and has Chromium save the page. Without --ckpt it uses the
shipped model (or $SDJAX_MODEL).
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt")
    p.add_argument("--rerank-model")
    p.add_argument("--prompt", default="a red circle on a blue background")  # the shipped model's captions
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "demo.png"))
    p.add_argument("--window-size", default="1280,1000")
    args = p.parse_args()

    from sdjax.demo import HIGH_NOISE_FRAC, build_demo, load_models

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        sys.exit("no chromium found: apt-get install -y chromium")
    pipe, reranker, refiner = load_models(args.ckpt, args.rerank_model)
    demo = build_demo(pipe, reranker, refiner)
    fn = next(d for d in demo.fns.values() if d.api_name == "generate")
    size = pipe.default_size
    # one generation now, shown by the page on load, so that the screenshot has a gallery and metadata
    result = fn.fn(args.prompt, "blurry, low quality", 7.5, size, size, args.steps, 0, HIGH_NOISE_FRAC, 42, False,
                   "dpmpp_2m", 4, reranker is not None)
    shown = [fn.inputs[i] for i in (0, 1, 5, 9)]  # prompt, negative prompt, steps, randomize
    with demo:
        # queue=False: a plain request, which Chromium's virtual time waits for (a queued event streams)
        demo.load(lambda: (args.prompt, "blurry, low quality", args.steps, False, *result), None,
                  [*shown, *fn.outputs], api_name=False, queue=False)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        allowed_paths=[str(demo.sdjax_outdir)])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=30000",
                            f"--screenshot={out}", f"--window-size={args.window_size}", f"http://127.0.0.1:{port}/"],
                           check=True, timeout=300)
    finally:
        demo.close()
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
