"""Workdir faults: a workdir that cannot be written, a second run on the same workdir, a full
disk while checkpointing, the checkpoint folder removed under a running job. Each gets a clear
error (or, for the removal, a warning and a fresh checkpoint) and the last complete checkpoint
stays readable. Read-only and full filesystems are tmpfs mounts, where this machine allows them
(root with mount rights); elsewhere those tests skip."""

import os
import shutil
import subprocess
import sys

import pytest

from clip_jax.train import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mount_tmpfs(path, size: str, read_only: bool = False) -> None:
    os.makedirs(path, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"this machine does not allow a tmpfs mount here ({done.stderr.strip()[:100]})")


def unmount(path) -> None:
    subprocess.run(["umount", str(path)], check=False)


def test_a_second_run_on_the_same_workdir_is_refused_naming_the_first(tmp_path):
    held = wd.lock(str(tmp_path))
    try:
        with pytest.raises(wd.WorkdirError, match=rf"is in use by another run \(pid {os.getpid()} on .*started "):
            wd.lock(str(tmp_path))
    finally:
        held.release()
    wd.lock(str(tmp_path)).release()  # released: free again (a dead process's lock is dropped by the kernel)


def test_a_read_only_workdir_is_named_before_any_work(tmp_path):
    mount_tmpfs(tmp_path / "ro", "1m", read_only=True)
    try:
        with pytest.raises(wd.WorkdirError, match="cannot be written \\(the filesystem is read-only\\)"):
            wd.check_writable(str(tmp_path / "ro" / "run"))
    finally:
        unmount(tmp_path / "ro")


def _probe_many(workdir: str) -> None:
    for _ in range(2000):
        wd.check_writable(workdir)


def test_the_processes_of_one_job_probe_their_shared_workdir_at_once(tmp_path):
    """Every process of a job checks the workdir as it starts: one's probe must not remove another's."""
    import multiprocessing

    procs = [multiprocessing.get_context("fork").Process(target=_probe_many, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert os.listdir(tmp_path) == []


def test_write_faults_are_told_by_cause():
    from clip_jax.train.checkpoint import _write_error

    class Manager:  # what _write_error reads of an Orbax CheckpointManager
        directory = "/w/checkpoints"

        def reload(self):
            pass

        def all_steps(self):
            return [100, 200, 300]

    full = ValueError("RESOURCE_EXHAUSTED: Error writing ... Failed to write 3215360 bytes to file 19: No space left "
                      "on device [os_error_code='28']")
    error = _write_error(Manager(), 300, full)
    assert str(error) == ("could not write step 300's checkpoint in /w/checkpoints: the filesystem is full (no space "
                          "left on device). The last complete checkpoint, step 200, is untouched: the same command "
                          "resumes from it once the fault is fixed. To fix: free space or move the workdir.")
    other = KeyError("not a filesystem fault")
    assert _write_error(Manager(), 300, other) is other  # anything else is raised as it is


def _train(workdir, cache, *extra, timeout=600):
    args = [f"--config={ROOT}/configs/smoke.py", f"--workdir={workdir}", f"--config.data.cache_dir={cache}",
            "--config.eval_every_steps=0", "--config.log_every_steps=1", "--config.model=ViT-Tiny-test",
            "--config.data.shapes_sizes.train=2560", "--config.data.shapes_sizes.validation=100",
            "--config.data.shapes_sizes.test=100", *extra]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", "clip_jax.train", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


SHARED_RUN = ("--config.total_steps=12", "--config.checkpoint_every_steps=2", "--config.batch_size=32",
              "--config.summary_png=False")


@pytest.mark.slow
def test_a_full_disk_stops_the_run_naming_the_last_complete_checkpoint_which_resumes(tmp_path, smoke_shapes):
    cache = smoke_shapes  # the smoke-sized dataset, shared with the other trainer tests
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "12m")  # one checkpoint of ViT-Tiny-test (~7.4 MB on disk), not two
    try:
        # the run of tests/test_multiprocess.py's 1-device CLIP layout (steps, batch): its compiled step, cached
        done = _train(disk / "run", cache, *SHARED_RUN)
        assert done.returncode != 0
        assert ("CheckpointWriteError: could not write step 2's checkpoint in " in done.stderr
                and "the filesystem is full (no space left on device). The last complete checkpoint, step 1, is "
                    "untouched" in done.stderr), done.stderr[-3000:]
        shutil.copytree(disk / "run", tmp_path / "moved")  # the user's fix: the workdir moved to a roomier disk
    finally:
        unmount(disk)
    again = _train(tmp_path / "moved", cache, *SHARED_RUN)
    assert again.returncode == 0 and "resumed from step 1" in again.stdout, again.stderr[-3000:]


def test_a_checkpoint_removed_under_the_run_is_said_and_written_again(tmp_path):
    import jax.numpy as jnp

    from clip_jax.train import checkpoint

    manager = checkpoint.make_manager(str(tmp_path / "checkpoints"), keep=3)
    state = {"w": jnp.arange(4.0)}
    checkpoint.save(manager, 1, state, force=True)
    checkpoint.finish(manager)
    shutil.rmtree(tmp_path / "checkpoints")  # as a user's rm -rf while the job runs
    said = []
    checkpoint.save(manager, 2, {"w": jnp.arange(4.0) + 1}, force=True, log=said.append)
    checkpoint.finish(manager)
    assert said == [f"warning: checkpoint 1 has gone from {tmp_path / 'checkpoints'} (its folder was removed or "
                    "changed under the running job); writing the current step's checkpoint now"]
    restored, _, step = checkpoint.restore(manager, {"w": jnp.zeros(4)})
    assert step == 2 and restored["w"].tolist() == [1.0, 2.0, 3.0, 4.0]
