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


def test_gs_workdir_files_go_through_epath(tmp_path, monkeypatch):
    """A gs:// workdir: config.json, metrics.jsonl (append, trim on resume) are read and written through
    epath (tf.io.gfile on Cloud Storage). Here gs:// is mocked onto tmp_path; a plain open() or os.path
    call on a gs:// path would miss the mock and fail. (Orbax writes the checkpoints through TensorStore.)"""
    import json

    from etils import epath
    from etils.epath import gpath
    from etils.epath.testing import mock_epath

    from clip_jax import export, train
    from configs import smoke

    local = lambda p: str(p).replace("gs://", f"{tmp_path}/gcs/")
    one = lambda fn, p, *a, **k: fn(local(p), *a, **k)
    two = lambda fn, p, dst, *a, **k: fn(local(p), local(dst), *a, **k)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else epath takes tf.io.gfile, past the mock
    fns = {k: one for k in ("open", "exists", "isdir", "listdir", "glob", "makedirs", "mkdir", "remove", "stat")}
    with mock_epath(rename=two, replace=two, **fns):
        config = smoke.get_config()
        train.write_run_config("gs://bucket/runs/a", config)
        assert (tmp_path / "gcs/bucket/runs/a/config.json").exists()
        assert export.read_run_config("gs://bucket/runs/a").to_dict() == json.loads(config.to_json())
        metrics = epath.Path("gs://bucket/runs/a/metrics.jsonl")
        with metrics.open("a") as f:  # as the trainer appends rows
            f.write("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
        train._trim_metrics(metrics, 3)  # a resume from step 3 drops rows 4, 5 and the line cut short
        rows = (tmp_path / "gcs/bucket/runs/a/metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
        try:
            export.read_run_config("gs://bucket/runs/missing")
            raise AssertionError("no error")
        except FileNotFoundError as e:
            assert "gs://bucket/runs/missing/config.json not found" in str(e)
