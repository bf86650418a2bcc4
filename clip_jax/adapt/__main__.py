"""python -m clip_jax.adapt --config=configs/adapt/METHOD.py --workdir=DIR [--config.KEY=VALUE ...]"""

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "configs/adapt/METHOD.py")
flags.DEFINE_string("workdir", None, "where results.json, checkpoints and metrics go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    from clip_jax.adapt.train import Preempted, run
    from clip_jax.parallel import distributed

    distributed.initialize()  # before anything touches the devices
    try:
        results = run(flags.FLAGS.config, flags.FLAGS.workdir)
    except Preempted as notice:
        print(notice, flush=True)
        return
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()))


if __name__ == "__main__":
    app.run(main)
