"""The package layout shows the layers, and the imports keep to them (read from the AST, function-
local imports included): models import nothing outside models (but the leaf clip_jax.registry);
input imports neither training nor
evaluation; methods import neither training, evaluation nor input; CPU support is imported only by
entry points (__main__ modules) and the benchmark."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "clip_jax")


def imports():
    """{module: {imported clip_jax modules}} for every module of the package."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = "clip_jax." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            module = module.removesuffix(".__init__")
            found = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clip_jax"):
                    found.add(node.module)
                    found.update(f"{node.module}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    found.update(a.name for a in node.names if a.name.startswith("clip_jax"))
            out[module] = found
    return out


def _in(module, package):
    return module == package or module.startswith(package + ".")


def test_import_directions():
    graph = imports()
    assert {"clip_jax.models", "clip_jax.input", "clip_jax.methods", "clip_jax.train", "clip_jax.evaluate",
            "clip_jax.cpu", "clip_jax.parallel", "clip_jax.benchmark"} <= set(graph)
    bad = []
    for module, targets in graph.items():
        for target in targets:
            if target == "clip_jax" or _in(target, "clip_jax.registry"):  # the package name; the leaf helper
                continue
            rules = [
                (_in(module, "clip_jax.models"), not _in(target, "clip_jax.models"), "models import only models"),
                (_in(module, "clip_jax.input"), _in(target, "clip_jax.train") or _in(target, "clip_jax.evaluate"),
                 "input imports neither train nor evaluate"),
                (_in(module, "clip_jax.methods"), any(_in(target, p) for p in (
                    "clip_jax.train", "clip_jax.evaluate", "clip_jax.input")), "methods sit below train and input"),
                (_in(module, "clip_jax.methods"), _in(target, "clip_jax.config"),
                 "the base config gathers the methods' sections: methods do not import it"),
                (_in(target, "clip_jax.cpu") and not _in(module, "clip_jax.cpu"),
                 not (module.endswith(".__main__") or _in(module, "clip_jax.benchmark")),
                 "cpu support only in entry points and the benchmark"),
            ]
            bad += [f"{module} -> {target}: {why}" for applies, broken, why in rules if applies and broken]
    assert not bad, "\n".join(sorted(bad))


def test_the_clis_keep_their_names():
    for cli in ("train", "evaluate", "benchmark"):
        assert os.path.exists(os.path.join(ROOT, cli, "__main__.py"))
    assert os.path.exists(os.path.join(ROOT, "export.py"))
