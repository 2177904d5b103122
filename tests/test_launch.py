"""launch/*.sh dry runs: the commands they would run (no gcloud, no GPU needed)."""
from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def dry_run(script: str, *args: str, env=None) -> list[list[str]]:
    out = subprocess.run(["bash", str(LAUNCH / script), "--dry-run", *args],
                         capture_output=True, text=True, check=True, env=env, timeout=60)
    return [shlex.split(line) for line in out.stdout.splitlines() if line and not line.startswith("#")]


def option(cmd: list[str], name: str, *default) -> str:
    return next((a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")), *default)


def test_tpu_vm_dry_run():
    cmds = dry_run("tpu_vm.sh", "--name", "sd-pod", "--zone", "us-central2-b", "--type", "v4-32",
                   "--project", "my-proj", "--prompts", "my prompts.txt", "--outdir", "out", "--workers", "4",
                   "--spot", "--delete", "--", "--n_samples", "4", "--ddim_steps", "30", "--prompt-extra", "a b")
    assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for c in cmds if c[0] == "gcloud")
    assert ["mkdir", "-p", "out"] in cmds
    cmds = [c for c in cmds if c[0] == "gcloud"]
    create = cmds[0]
    assert create[4:6] == ["create", "sd-pod"] and "--spot" in create
    assert option(create, "--accelerator-type") == "v4-32" and option(create, "--zone") == "us-central2-b"
    assert option(create, "--project") == "my-proj"
    ssh = [c for c in cmds if c[4] == "ssh"]
    assert ssh and all(option(c, "--worker") == "all" for c in ssh)
    assert any("pip install" in option(c, "--command") and "sdjax" in option(c, "--command") for c in ssh)
    copy = next(c for c in cmds if c[4] == "scp" and c[5] == "my prompts.txt")
    assert option(copy, "--worker") == "all" and copy[6].startswith("sd-pod:")
    remote_prompts = copy[6].split(":", 1)[1]
    run = shlex.split(next(option(c, "--command") for c in ssh if "txt2img" in option(c, "--command")))
    assert run[:4] == ["python3", "-m", "sdjax.cli", "txt2img"]
    assert run[run.index("--from-file") + 1] == remote_prompts
    assert run[-6:] == ["--n_samples", "4", "--ddim_steps", "30", "--prompt-extra", "a b"]
    # multi-host: sdjax auto-detects the TPU slice's workers, so no distributed flags; each worker its own folder
    assert not {"--coordinator", "--num-processes", "--process-id"} & set(run)
    assert run[run.index("--outdir") + 1] == "sdjax-run/outputs/$(hostname)"
    collect = [c for c in cmds if c[4] == "scp" and "--recurse" in c and c[-1].startswith("--worker=")]
    assert [option(c, "--worker") for c in collect] == ["0", "1", "2", "3"]
    assert [c[6:8] for c in collect] == [["sd-pod:sdjax-run/outputs", f"out/worker-{w}"] for w in range(4)]
    assert cmds[-1][4:6] == ["delete", "sd-pod"]


def test_tpu_vm_shared_outdir():
    cmds = dry_run("tpu_vm.sh", "--name", "pod", "--zone", "z", "--prompts", "p.txt", "--outdir", "out",
                   "--workers", "4", "--shared-outdir", "/mnt/fs/my run", "--no-create")
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    run = shlex.split(next(option(c, "--command") for c in gcloud if "txt2img" in option(c, "--command", "")))
    assert run[run.index("--outdir") + 1] == "/mnt/fs/my run"  # every worker writes to the shared folder
    collect = [c for c in gcloud if c[4] == "scp" and "--recurse" in c]
    assert [c[6:8] for c in collect] == [["pod:/mnt/fs/my run", "out/shared"]]  # copied back once
    assert option(collect[0], "--worker") == "0"


def test_tpu_vm_needs_name_zone_prompts():
    r = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "--zone", "z", "--prompts", "p.txt", "--dry-run"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--name" in r.stderr and not r.stdout


def test_multi_gpu_dry_run(tmp_path):
    cmds = dry_run("multi_gpu.sh", "--prompts", "p.txt", "--outdir", str(tmp_path / "o"), "--gpus", "0,1",
                   "--pip", "sdjax==0.1.0", "--", "--n_samples", "8", "--scale", "5")
    install, *rest = cmds
    assert install[1:5] == ["-m", "pip", "install", "-U"] and "sdjax==0.1.0" in install
    assert any(a.startswith("jax[cuda") for a in install)
    run = rest[-1]
    assert run[0] == "env" and "CUDA_VISIBLE_DEVICES=0,1" in run
    i = run.index("sdjax.cli")
    assert run[i + 1:] == ["txt2img", "--from-file", "p.txt", "--outdir", str(tmp_path / "o"),
                           "--n_samples", "8", "--scale", "5"]
    assert not (tmp_path / "o").exists()  # a dry run runs nothing
    # one host: one process for all its GPUs, no distributed flags
    assert not {"--coordinator", "--num-processes", "--process-id"} & set(run)


def test_multi_gpu_passes_multi_host_flags_through():
    flags = ["--coordinator", "10.0.0.1:8476", "--num-processes", "2", "--process-id", "1"]
    run = dry_run("multi_gpu.sh", "--prompts", "p.txt", "--no-install", "--", *flags)[-1]
    assert run[-6:] == flags
