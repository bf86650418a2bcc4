"""python -m clip_jax.evaluate [...] (clip_jax.evaluate.evaluator.main), plus

    --predictions=DIR   each segmentation spec of --eval writes DIR/segmentation/DATASET.SPLIT/KEY.png (8-bit
                        class indices, 0 = background), classes.json and picture.png; each detection spec
                        DIR/detection/DATASET.SPLIT/detections.json (COCO's results format), images.json,
                        categories.json and picture.png (their option predictions=DIR)
"""

import sys

from clip_jax.evaluate.evaluator import main, parse_evals

WRITERS = ("segmentation", "detection", "grounding")  # the tasks whose spec takes predictions=DIR


def with_predictions(argv: list) -> list:
    """argv without --predictions=DIR, that DIR given to every segmentation, detection and grounding spec of its
    --eval values."""
    directory, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--predictions" and i + 1 < len(argv):
            directory, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--predictions="):
            directory = arg.partition("=")[2]
        else:
            rest.append(arg)
        i += 1
    if directory is None:
        return argv
    out, found, i = [], False, 0
    while i < len(rest):
        arg, value = rest[i], None
        if arg == "--eval" and i + 1 < len(rest):
            value, i = rest[i + 1], i + 1
        elif arg.startswith("--eval="):
            value = arg.partition("=")[2]
        if value is None:
            out.append(arg)
        else:
            specs = []
            for spec in parse_evals(value):
                if spec.task in WRITERS:
                    found = True
                    spec = spec.__class__(spec.task, spec.data, tuple(sorted(dict(spec.options,
                                                                                 predictions=directory).items())))
                specs.append(str(spec))
            out.append("--eval=" + ",".join(specs))
        i += 1
    if not found:
        sys.exit("--predictions=DIR writes the masks of segmentation specs and the boxes of detection and grounding "
                 "specs: pass --eval=segmentation=DATA, --eval=detection=DATA or --eval=grounding=DATA with it (e.g. "
                 "--eval=segmentation=DATA:test)")
    return out


if __name__ == "__main__":
    sys.exit(0 if main(with_predictions(sys.argv[1:])) is not None else 1)
