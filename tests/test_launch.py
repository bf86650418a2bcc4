"""Launch scripts: their --dry-run output is the complete command (no cluster is reachable here)."""

import os
import shlex
import subprocess

import pytest

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
    directives = {line.split("=", 1)[0][len("#SBATCH "):]: line.split("=", 1)[1]
                  for line in lines if line.startswith("#SBATCH --") and "=" in line}
    assert directives == {
        "--job-name": "clip_jax", "--nodes": "2", "--ntasks-per-node": "1", "--gpus-per-node": "8",
        "--time": "48:00:00", "--signal": "TERM@600", "--output": "/shared/runs/b16/slurm-%j.out",
        "--partition": "gpu", "--account": "vision",
    }
    assert "#SBATCH --exclusive" in lines and "#SBATCH --requeue" in lines and lines[0] == "#!/bin/bash"
    assert f"cd {ROOT}" in lines
    (srun,) = [line for line in lines if line.startswith("srun ")]
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


def test_perf_flags_reach_the_job_environment():
    """--perf-flags: the GPU job exports XLA_FLAGS with the overlap flags ahead of the caller's;
    every TPU worker trains with LIBTPU_INIT_ARGS. Without the option, neither is touched."""
    def perf_sets(name):
        out = subprocess.run(["bash", "-c", f"source {ROOT}/launch/lib.sh; printf '%s' \"${name}\""],
                             capture_output=True, text=True, check=True)
        return out.stdout.split()

    gpu, tpu = perf_sets("GPU_PERF_XLA_FLAGS"), perf_sets("TPU_PERF_LIBTPU_ARGS")
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in gpu and len(gpu) == 4
    assert "--xla_tpu_enable_async_collective_fusion=true" in tpu and len(tpu) == 7
    train = ["--", "--config=c", "--workdir=/w"]
    lines = run("slurm.sh", "--nodes=2", "--perf-flags", "--dry-run", *train).stdout.splitlines()
    (export,) = [line for line in lines if line.startswith("export XLA_FLAGS=")]
    assert lines.index(export) < lines.index(next(line for line in lines if line.startswith("srun ")))
    env = subprocess.run(["bash", "-c", export + '; printf "%s" "$XLA_FLAGS"'], capture_output=True, text=True,
                         env=dict(os.environ, XLA_FLAGS="--mine=1")).stdout.split()
    assert env == gpu + ["--mine=1"]
    plain_lines = run("slurm.sh", "--nodes=2", "--dry-run", *train).stdout.splitlines()
    assert not any("XLA_FLAGS" in line for line in plain_lines)

    tpu_train = ["train", "--name=p", "--zone=z", "--dry-run", "--", "--config=c", "--workdir=gs://b/w"]
    (ssh,) = commands(run("tpu_pod.sh", *tpu_train[:4], "--perf-flags", *tpu_train[4:]).stdout)
    worker = remote(ssh)
    assert worker[3] == "LIBTPU_INIT_ARGS=" + " ".join(tpu) and worker[4] == "PYTHON=python3"
    (ssh,) = commands(run("tpu_pod.sh", *tpu_train).stdout)
    assert "LIBTPU_INIT_ARGS" not in ssh[-1]


def test_gs_workdir_files_go_through_epath(tmp_path, monkeypatch):
    """A gs:// workdir: config.json, metrics.jsonl (append, trim on resume) are read and written through
    epath (tf.io.gfile on Cloud Storage). Here gs:// is mocked onto tmp_path; a plain open() or os.path
    call on a gs:// path would miss the mock and fail. (Orbax writes the checkpoints through TensorStore.)"""
    import json

    from etils import epath
    from etils.epath import gpath
    from etils.epath.testing import mock_epath

    from clip_jax import runs, train
    from clip_jax.train import trainer
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
        assert json.loads(runs.read_config("gs://bucket/runs/a").to_json()) == json.loads(config.to_json())
        metrics = epath.Path("gs://bucket/runs/a/metrics.jsonl")
        with metrics.open("a") as f:  # as the trainer appends rows
            f.write("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
        trainer._trim_metrics(metrics, 3)  # a resume from step 3 drops rows 4, 5 and the line cut short
        rows = (tmp_path / "gcs/bucket/runs/a/metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
        try:
            runs.read_config("gs://bucket/runs/missing")
            raise AssertionError("no error")
        except FileNotFoundError as e:
            assert "gs://bucket/runs/missing/config.json not found" in str(e)


# -- Cloud TPU pods -------------------------------------------------------------------------

TRAIN = ["--config=configs/clip_paper.py:ViT-B-16", "--workdir=gs://bkt/runs/b16",
         "--config.data.train=tfrecord:gs://bkt/laion/*.tfrecord", "--config.note=it's $HOME"]


def commands(out: str):
    """The dry run's command lines as argv lists (comments dropped; a `| tee` pipe split off)."""
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def remote(argv):
    """The --command of a gcloud ssh argv, as the worker's shell splits it."""
    (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    return shlex.split(command)


def test_tpu_pod_v4_32_spot_dry_run():
    out = run("tpu_pod.sh", "run", "--name=clip-b16", "--zone=us-central2-b", "--accelerator=v4-32", "--spot",
              "--dry-run", "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    assert "v4-32 (16 chips on 4 hosts, runtime tpu-ubuntu2204-base, spot)" in out.stderr
    cmds = commands(out.stdout)
    scope = ["--zone=us-central2-b"]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "clip-b16", *scope]
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", "clip-b16", *scope,
                "--format=value(state.state)"]
    delete = ["gcloud", "compute", "tpus", "queued-resources", "delete", "clip-b16", *scope, "--force", "--quiet"]
    tarball = cmds[2][cmds[2].index("czf") + 1]
    assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "clip-b16", "--node-id=clip-b16",
                       *scope, "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"]
    assert cmds[1] == describe
    assert cmds[2] == ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "|", "tar",
                       "czf", tarball, "-C", ROOT, "--null", "-T", "-"]
    assert cmds[3] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "clip-b16:clip_jax.tgz", *scope,
                       "--worker=all"]
    assert cmds[4][:-1] == ssh + ["--worker=all"]
    assert remote(cmds[4]) == ["rm", "-rf", "~/clip_jax", "&&", "mkdir", "-p", "~/clip_jax", "&&", "tar", "xzf",
                               "~/clip_jax.tgz", "-C", "~/clip_jax"]
    assert remote(cmds[5]) == ["cd", "~/clip_jax", "&&", "python3", "-m", "pip", "install", "-q", "-e", ".[data]",
                               "jax[tpu]", "-f", "https://storage.googleapis.com/jax-releases/libtpu_releases.html"]
    # The same training command on every worker; the arguments survive both shells intact.
    assert cmds[6][:-1] == ssh + ["--worker=all"]
    assert remote(cmds[6]) == ["cd", "~/clip_jax", "&&", "PYTHON=python3", "bash", "~/clip_jax/launch/tpu_worker.sh",
                               "start", *TRAIN]
    assert cmds[7] == ssh + ["--worker=0", "--command=tail -n +1 -F ~/clip_jax_train.log", "|", "tee", "-a",
                             "tpu_logs/clip-b16.log"]
    assert cmds[8] == describe
    assert remote(cmds[9])[-4:] == ["tpu_worker.sh", "status;", "else", "echo", "no-code;", "fi"][-4:]
    assert cmds[10] == delete and cmds[11] == delete  # preempted: re-create; finished: delete
    assert len(cmds) == 12


def test_tpu_pod_v5e_256_on_demand_git_dry_run():
    out = run("tpu_pod.sh", "run", "--name=clip-l14", "--zone=us-west4-a", "--accelerator=v5e-256",
              "--project=my-proj", "--code=git:https://github.com/acme/clip_jax.git@v0.1", "--python=python3.11",
              "--keep", "--dry-run", "--", *TRAIN)
    assert out.returncode == 0, out.stderr
    assert "v5litepod-256 (256 chips on 64 hosts, runtime v2-alpha-tpuv5-lite)" in out.stderr
    cmds = commands(out.stdout)
    scope = ["--zone=us-west4-a", "--project=my-proj"]
    assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "clip-l14", "--node-id=clip-l14",
                       *scope, "--accelerator-type=v5litepod-256", "--runtime-version=v2-alpha-tpuv5-lite"]
    assert remote(cmds[2]) == ["rm", "-rf", "~/clip_jax", "&&", "git", "clone", "-q",
                               "https://github.com/acme/clip_jax.git", "~/clip_jax", "&&", "git", "-C", "~/clip_jax",
                               "checkout", "-q", "v0.1"]
    assert cmds[2][:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "clip-l14", *scope]
    assert remote(cmds[3])[3] == "python3.11"
    assert remote(cmds[4])[3:] == ["PYTHON=python3.11", "bash", "~/clip_jax/launch/tpu_worker.sh", "start", *TRAIN]
    assert "--worker=all" in cmds[4] and "--worker=0" in cmds[5]
    assert "# finished: --keep, the slice stays" in out.stdout
    assert sum(c[3:5] == ["queued-resources", "delete"] for c in cmds) == 1  # only the preemption path deletes


def test_tpu_pod_actions_and_errors():
    base = ["--name=p", "--zone=z", "--dry-run"]
    assert commands(run("tpu_pod.sh", "stop", *base).stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "p", "--zone=z", "--worker=all",
         "--command=bash ~/clip_jax/launch/tpu_worker.sh stop"]]
    assert commands(run("tpu_pod.sh", "delete", *base).stdout) == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "p", "--zone=z", "--force", "--quiet"]]
    assert "--runtime-version=v2-alpha-tpuv6e" in run("tpu_pod.sh", "create", *base, "--accelerator=v6e-64").stdout
    v5p = run("tpu_pod.sh", "create", *base, "--accelerator=v5p-128", "--runtime=custom-rt", "--reserved")
    assert "64 chips on 16 hosts" in v5p.stderr and "--runtime-version=custom-rt --reserved" in v5p.stdout
    assert "1 hosts" in run("tpu_pod.sh", "create", *base, "--accelerator=v5e-8").stderr
    errors = {
        ("create", "--zone=z", "--accelerator=v4-32"): "--name=NAME is required",
        ("create", "--name=p", "--accelerator=v4-32"): "--zone=ZONE is required",
        ("create", "--name=p", "--zone=z", "--accelerator=v3-8"): "--accelerator=TYPE is required",
        ("train", "--name=p", "--zone=z", "--", "--config=c", "--workdir=/local/run"): "must be on Cloud Storage",
        ("train", "--name=p", "--zone=z", "--", "--workdir=gs://b/r"): "at least --config=... and --workdir=gs://",
        ("setup", "--name=p", "--zone=z", "--code=svn:x"): "--code must be 'copy' or 'git:URL[@REF]'",
        ("launch", "--name=p", "--zone=z"): "usage:",
        ("stop", "--name=p", "--zone=z", "--config=c"): "train arguments go after --",
    }
    for args, message in errors.items():
        bad = run("tpu_pod.sh", *args, "--dry-run")
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)


def _run_pod(tmp_path, scenario, *extra):
    import json
    import re

    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    env = dict(os.environ, GCLOUD=f"{ROOT}/tests/fixtures/fake_gcloud.py", FAKE_GCLOUD_DIR=str(tmp_path),
               TMPDIR=str(tmp_path))
    out = subprocess.run(["bash", f"{ROOT}/launch/tpu_pod.sh", "run", "--name=p", "--zone=z", "--accelerator=v4-32",
                          "--spot", "--poll=0", f"--log-dir={tmp_path}/logs", *extra, "--", "--config=c",
                          "--workdir=gs://b/r"], env=env, capture_output=True, text=True, timeout=120)
    ops = []
    for line in (tmp_path / "calls.jsonl").read_text().splitlines():
        args = json.loads(line)
        command = " ".join(a for a in args if a.startswith("--command="))
        if args[2] == "queued-resources" and args[3] != "describe":
            ops.append(args[3])
        elif args[3] == "scp":
            ops.append("scp")
        elif re.search(r"tpu_worker.sh (start|status|stop)", command):
            ops.append(re.search(r"tpu_worker.sh (start|status|stop)", command).group(1))
        elif "pip install" in command:
            ops.append("install")
    return out, ops


def test_tpu_pod_run_recreates_a_preempted_spot_slice_and_resumes(tmp_path):
    out, ops = _run_pod(tmp_path, ["running", "preempt", "running", "running", "finished"])
    assert out.returncode == 0, out.stderr
    slice_ = ["create", "scp", "install", "start"]
    assert ops == slice_ + ["status"] * 2 + ["delete"] + slice_ + ["status"] * 3 + ["delete"]
    assert "restart 1 of at most 20" in out.stderr and "training finished" in out.stderr
    assert "step=50 loss=3.1" in (tmp_path / "logs" / "p.log").read_text()  # the streamed log is kept


def test_tpu_pod_run_stops_on_failure_and_after_max_restarts(tmp_path):
    (tmp_path / "a").mkdir()
    out, ops = _run_pod(tmp_path / "a", ["running", "failed 3"])
    assert out.returncode == 1 and "training failed 3" in out.stderr
    assert "delete" not in ops  # kept for inspection
    (tmp_path / "b").mkdir()
    out, ops = _run_pod(tmp_path / "b", ["preempt", "preempt"], "--max-restarts=1")
    assert out.returncode == 1 and "preempted 2 times (--max-restarts=1)" in out.stderr
    assert ops.count("create") == 2


def test_tpu_worker_start_status_stop(tmp_path):
    """The worker side: training detached from the caller, its status, SIGTERM -> 'preempted'."""
    fake = tmp_path / "python"
    fake.write_text("""#!/usr/bin/env bash
echo "args: $* distributed=$CLIP_JAX_DISTRIBUTED"
case $FAKE_MODE in
  finish) exit 0 ;;
  fail) exit 3 ;;
esac
trap 'echo "preemption notice (SIGTERM): saved a checkpoint at step 7 in gs://b/r; exiting."; exit 0' TERM
while :; do sleep 0.05; done
""")
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), CLIP_JAX_STATE_DIR=str(tmp_path))
    worker = lambda *args, **kw: subprocess.run(["bash", f"{ROOT}/launch/tpu_worker.sh", *args], cwd=ROOT,
                                                env=dict(env, **kw), capture_output=True, text=True, timeout=30)
    import time

    def status_becomes(want):
        for _ in range(100):
            if (got := worker("status").stdout.strip()) == want:
                return True
            time.sleep(0.05)
        raise AssertionError(f"status {got!r}, want {want!r}")

    assert worker("status").stdout.strip() == "none"
    started = worker("start", "--config=c", "--workdir=gs://b/r", "--x=a b")
    assert started.returncode == 0 and "started clip_jax.train" in started.stdout
    status_becomes("running")
    assert "already runs" in worker("start", "--config=c").stdout  # a second start does not double the job
    assert "sent SIGTERM" in worker("stop").stdout
    status_becomes("preempted")
    log = (tmp_path / "clip_jax_train.log").read_text()
    assert "args: -m clip_jax.train --config=c --workdir=gs://b/r --x=a b distributed=1" in log
    worker("start", "--config=c", FAKE_MODE="finish")
    status_becomes("finished")
    worker("start", "--config=c", FAKE_MODE="fail")
    status_becomes("failed 3")
    assert "is not running" in worker("stop").stdout


@pytest.mark.slow
def test_gpu_bench_runs_every_clip_model_and_tabulates_them(tmp_path):
    """launch/gpu_bench.sh's smoke mode on the CPU: the same commands as on the GPU, tiny models."""
    import json
    import sys

    out = subprocess.run(["bash", f"{ROOT}/launch/gpu_bench.sh", "run", str(tmp_path), "clip,open_clip"],
                         capture_output=True, text=True,
                         env=dict(os.environ, CLIP_JAX_GPU_BENCH_SMOKE="1", PYTHON=sys.executable))
    assert out.returncode == 0, out.stderr + out.stdout
    figures = json.load(open(tmp_path / "figures.json"))
    log = open(tmp_path / "bench.log").read()
    assert [r.get("model") for r in figures["clip"]] == ["ViT-Tiny-test", "RN-Tiny-test"], log
    for r in figures["clip"]:
        assert r["dtype"] == "bfloat16" and r["scan"] == "True" and float(r["images/s"]) > 0
        row = f"| {r['model']} | 16 | {float(r['images/s']):,.0f} | {float(r['mfu']):.1%} |"
        assert row in out.stdout and row in open(tmp_path / "summary.md").read()
    assert "== open_clip: skipped" in log and log.count("exit 0 after") == 2


def test_gpu_bench_skips_runs_that_do_not_fit_the_budget_and_checks_its_arguments(tmp_path):
    env = dict(os.environ, CLIP_JAX_GPU_BENCH_SMOKE="1")
    out = subprocess.run(["bash", f"{ROOT}/launch/gpu_bench.sh", "run", str(tmp_path), "clip", "--budget=40"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("skipped,") == 2 and "exit " not in out.stdout
    for args, message in [(["run", str(tmp_path), "clip,gpu"], "unknown part 'gpu'"),
                          (["run", str(tmp_path), "--budget=ten"], "--budget must be whole seconds"),
                          (["run"], "usage:"), (["run", str(tmp_path), "--fast"], "unknown option --fast")]:
        bad = subprocess.run(["bash", f"{ROOT}/launch/gpu_bench.sh", *args], capture_output=True, text=True, env=env)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)


def test_gpu_bench_summary_pairs_each_model_with_open_clip(tmp_path):
    import sys

    sys.path.insert(0, f"{ROOT}/launch")
    import gpu_bench_summary

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "clip_1_ViT-B-16_256.log").write_text(
        "== clip_1_ViT-B-16_256 (timeout 240s): python3 ...\nWARNING: something: else\nmodel: ViT-B-16\nbatch: 256\n"
        "compile_s: 41.5\nstep_s: 0.05\nimages/s: 5120\nmfu: 0.5951\nmemory_gib: 30.25\n== exit 0\n")
    (logs / "clip_2_ViT-L-14_128.log").write_text("== clip_2\nTraceback (most recent call last):\nOOM\n== exit 1\n")
    (logs / "open_clip.log").write_text(
        '{"gpu": "NVIDIA H200", "bf16_matmul_tflops": 790.0}\n'
        '{"model": "ViT-B-16", "batch": 256, "compiled": false, "step_s": 0.16, "img_per_s": 1600.0}\n'
        '{"model": "ViT-B-16", "batch": 256, "compiled": true, "step_s": 0.1, "img_per_s": 2560.0}\n'
        '{"model": "RN50", "batch": "256", "error": "RuntimeError(boom)"}\n')
    (logs / "max_batch_clip.log").write_text("probe: batch/device=512 memory_gib=60 fits=True\nmodel: ViT-B-16\n"
                                            "max_batch_per_device: 1792\nmemory_gib: 130.1\nran_step_s: 0.4\n")
    (logs / "max_batch_open_clip.log").write_text("== max_batch_open_clip: skipped (needs a CUDA GPU)\n")
    (logs / "ab.log").write_text("model: ViT-B-16\nbatch: 256\nscan.settings: {'scan': True}\nscan.images/s: 4000\n"
                                 "scan.speedup: 1\nplain.settings: {'scan': False}\nplain.images/s: 4400.4\n"
                                 "plain.speedup: 1.1\nplain.speedup_range: 1.05-1.15\n")
    summary = gpu_bench_summary.main([str(logs), str(tmp_path)])
    assert "| ViT-B-16 | 256 | 5,120 | 59.5% | 30.25 | 42 | 1,600 | 2,560 | 3.20 | 2.00 | 4,400 |" in summary
    assert "| ViT-L-14_128 | failed: see bench.log |" in summary
    assert "open_clip RN50 batch 256 failed: RuntimeError(boom)" in summary
    assert "largest batch, clip: 1792 (ViT-B-16, 130.1 GiB, confirmed by a step)" in summary
    assert "largest batch, open_clip: none" in summary
    assert "- plain {'scan': False}: 4,400 img/s, 1.1 x the first (1.05-1.15)" in summary
    assert open(tmp_path / "summary.md").read() == summary + "\n"
