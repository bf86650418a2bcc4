"""python -m clip_jax.train --config=configs/smoke.py --workdir=DIR [--config.x=...] [--onednn_dots=auto|on|off]

A second run on the same workdir resumes from its latest checkpoint. The allocator is the
launcher's choice (launch/local_cpu.sh preloads tcmalloc where installed).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "an ml_collections config file, e.g. configs/smoke.py")
flags.DEFINE_string("workdir", None, "where checkpoints and metrics.jsonl go; a second run resumes there")
flags.DEFINE_enum("onednn_dots", "auto", ["auto", "on", "off"],
                  "on a CPU: the train step's matmuls through oneDNN (auto: Intel CPUs, float32, one device)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    from clip_jax.parallel import distributed

    distributed.initialize()  # before anything touches the devices
    import jax

    from clip_jax.cpu import allocator, onednn
    from clip_jax.train import trainer

    config = flags.FLAGS.config
    devices = jax.devices()
    if devices[0].platform == "cpu":
        trainer.log(f"host allocator: {allocator.allocator()}")
    options = onednn.step_compiler_options(flags.FLAGS.onednn_dots, devices, config.dtype)
    if options:
        trainer.log("train step: XLA:CPU matmuls through oneDNN (--onednn_dots)")
    cache = config.compilation_cache_dir
    if cache != "none":  # compiled steps persist: a restart (after a crash or preemption) skips the compile
        jax.config.update("jax_compilation_cache_dir",
                          cache or os.path.join(os.path.expanduser("~"), ".cache", "clip_jax", "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    trainer.train_and_evaluate(config, flags.FLAGS.workdir, compiler_options=options,
                               retain=lambda step: onednn.keep_alive(step, options))
    from clip_jax.input.pipeline import input_reader_stuck

    if input_reader_stuck():  # left waiting inside tf.data: the interpreter's teardown would abort on it
        import sys

        trainer.log("the input reader is still inside tf.data; leaving without the interpreter's teardown")
        if jax.process_count() > 1:  # os._exit skips JAX's exit hook: the coordinator would vanish under its peers
            jax.distributed.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    app.run(main)
