"""Launch scripts: their --dry-run output is the complete command (no cluster is reachable here)."""

import os
import shlex
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    return subprocess.run(["bash", f"{ROOT}/launch/{script}", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON="python3"))


def test_slurm_two_nodes_dry_run():
    out = run("slurm.sh", "--nodes=2", "--gpus-per-node=8", "--partition=gpu", "--account=vision", "--time=48:00:00",
              "--dry-run", "--", "--config=configs/clip_paper.py:ViT-B-16", "--workdir=/shared/runs/b16",
              "--config.data.train=tfrecord:/shared/laion/*.tfrecord")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    directives = {l.split("=", 1)[0][len("#SBATCH "):]: l.split("=", 1)[1] for l in lines if l.startswith("#SBATCH --") and "=" in l}
    assert directives == {
        "--job-name": "clip_jax", "--nodes": "2", "--ntasks-per-node": "1", "--gpus-per-node": "8",
        "--time": "48:00:00", "--signal": "TERM@600", "--output": "/shared/runs/b16/slurm-%j.out",
        "--partition": "gpu", "--account": "vision",
    }
    assert "#SBATCH --exclusive" in lines and "#SBATCH --requeue" in lines and lines[0] == "#!/bin/bash"
    assert f"cd {ROOT}" in lines
    (srun,) = [l for l in lines if l.startswith("srun ")]
    assert shlex.split(srun) == ["srun", "--kill-on-bad-exit=1", "python3", "-m", "clip_jax.train",
                                 "--config=configs/clip_paper.py:ViT-B-16", "--workdir=/shared/runs/b16",
                                 "--config.data.train=tfrecord:/shared/laion/*.tfrecord"]
    assert lines[-1] == "mkdir -p /shared/runs/b16 && sbatch SCRIPT"


def test_slurm_errors():
    assert "--nodes=N is required" in run("slurm.sh", "--dry-run", "--", "--config=c", "--workdir=w").stderr
    assert "at least --config=... and --workdir=..." in run("slurm.sh", "--nodes=2", "--dry-run", "--",
                                                            "--config=c").stderr
    bad = run("slurm.sh", "--nodes=2", "--config=c")
    assert bad.returncode == 2 and "train arguments go after --" in bad.stderr
