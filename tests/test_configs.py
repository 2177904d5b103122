"""Every run config in configs/ parses, and flags override its values."""
from pathlib import Path

import pytest

from sdjax import cli
from sdjax.app import mesh_devices
from sdjax.samplers import SAMPLERS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def settings(argv):
    args = cli.build_parser().parse_args(argv)
    return cli.resolve_settings(args, args.command)


def test_there_are_configs_for_each_model_family():
    assert {p.stem for p in CONFIGS} >= {"sd15", "sd21", "sdxl", "sdxl_refiner", "tiny", "x4_upscaler"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    raw = cli.load_config(str(path))
    assert raw, path
    upscaler = "noise_level" in raw  # `sdjax upscale`: no H/W, the output is 4x the input image
    s = settings(["upscale", "--config", str(path), "--init-img", "low.png"] if upscaler
                 else ["txt2img", "--config", str(path)])
    assert s["sampler"] in SAMPLERS
    assert int(s["ddim_steps"]) >= 1 and float(s["scale"]) > 0
    if upscaler:
        assert int(s["noise_level"]) >= 0 and 0 <= int(s["tile_overlap"]) < int(s["tile_size"])
    else:
        assert int(s["H"]) % 8 == 0 and int(s["W"]) % 8 == 0
    assert s["precision"] in ("full", "autocast")
    assert mesh_devices(s["mesh"])  # every device by default
    if "refiner" in raw:  # the SDXL base -> refiner hand-off
        assert 0.0 < s["high_noise_frac"] < 1.0 and int(s.get("refiner_steps") or s["ddim_steps"]) >= 1


def test_flags_override_config():
    path = str(CONFIGS[0])
    s = settings(["txt2img", "--config", path, "--ddim_steps", "7", "--sampler", "euler", "--H", "256"])
    assert (s["ddim_steps"], s["sampler"], s["H"]) == (7, "euler", 256)
    assert settings(["txt2img", "--config", path, "--plms"])["sampler"] == "pndm"


def test_bad_config_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 10\ncolour: red\n")
    with pytest.raises(cli.UsageError, match="unknown keys colour"):
        cli.load_config(str(bad))
    with pytest.raises(cli.UsageError, match="no such file"):
        cli.load_config(str(tmp_path / "missing.yaml"))
