"""The package layout shows the layers, and the imports keep to them (read from the AST, function-
local imports included): models import nothing outside models (but the leaf clip_jax.registry);
input imports neither training nor evaluation; evaluation imports nothing of training; methods
import neither training, evaluation nor input; CPU support is imported only by entry points
(__main__ modules) and the benchmark. Evaluation names no dataset. No module imports one of a layer
above its own (LAYERS), and no import circle joins modules, whatever their layer."""

import ast
import os
import re

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
                (_in(module, "clip_jax.evaluate"), _in(target, "clip_jax.train"), "evaluate imports nothing of train"),
                (_in(module, "clip_jax.methods"), _in(target, "clip_jax.config"),
                 "the base config gathers the methods' sections: methods do not import it"),
                (_in(target, "clip_jax.cpu") and not _in(module, "clip_jax.cpu"),
                 not (module.endswith(".__main__") or _in(module, "clip_jax.benchmark")),
                 "cpu support only in entry points and the benchmark"),
            ]
            bad += [f"{module} -> {target}: {why}" for applies, broken, why in rules if applies and broken]
    assert not bad, "\n".join(sorted(bad))


# Every part of the package, bottom up: a module imports only its own part and the layers below
# its part's. A part is the longest prefix listed; a leaf module of a package can sit below it.
LAYERS = (
    ("clip_jax.registry", "clip_jax.input.tf_runtime", "clip_jax.input.settings"),  # leaves
    ("clip_jax.models",),
    ("clip_jax.parallel", "clip_jax.preprocessing", "clip_jax.convert", "clip_jax.tokenizers", "clip_jax.cpu"),
    ("clip_jax.phrases",),  # prompts and positive maps: character spans to tokens, for the input and the methods
    ("clip_jax.rename_rules",),  # tables of tensor renames, on convert's per-layer helpers
    # other libraries' layouts, read by api's load
    ("clip_jax.convert_big_vision", "clip_jax.convert_timm", "clip_jax.convert_audioclip", "clip_jax.hf_layouts"),
    ("clip_jax.hub",),  # hub names -> model directories (hf_layouts says which files a directory needs)
    ("clip_jax.methods", "clip_jax.input", "clip_jax.api"),
    ("clip_jax.config",),  # the base config gathers the registered methods' sections
    ("clip_jax.runs",),  # reads a run: below evaluation, export and adaptation
    ("clip_jax.evaluate",),
    ("clip_jax.train",),
    ("clip_jax.adapt", "clip_jax.export", "clip_jax.embed"),
    ("clip_jax.compile_check",),
    ("clip_jax.benchmark",),
    ("clip_jax",),  # the package's public names
)


def part_of(module):
    """(the part of LAYERS `module` belongs to, its layer's index)."""
    found = [(p, i) for i, parts in enumerate(LAYERS) for p in parts if _in(module, p)]
    assert found, f"{module} is in no layer of LAYERS: add it where it belongs"
    return max(found, key=lambda f: len(f[0]))


def _module_graph():
    """{module: {the package's modules it imports}}, targets named down to a module of the package."""
    graph = imports()

    def module_of(target):
        while target not in graph and "." in target:
            target = target.rsplit(".", 1)[0]
        return target

    return {m: {module_of(t) for t in targets} - {m, "clip_jax"} for m, targets in graph.items()}


def test_nothing_imports_upward():
    bad = []
    for module, targets in _module_graph().items():
        part, layer = part_of(module)
        for target in targets:
            other, other_layer = part_of(target)
            if other != part and other_layer >= layer:
                bad.append(f"{module} -> {target}: {part} (layer {layer}) imports {other} (layer {other_layer})")
    assert not bad, "\n".join(sorted(bad))


def cycles(graph):
    """The import circles of `graph`: each strongly connected set of more than one module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycles_finds_a_circle_and_only_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_circle_in_any_subpackage():
    graph = _module_graph()
    packages = {"clip_jax." + os.path.relpath(folder, ROOT).replace(os.sep, ".") for folder, _, files in os.walk(ROOT)
                if "__init__.py" in files and folder != ROOT}
    assert packages and packages <= set(graph)  # every subpackage's modules are read
    # A package's __init__ importing its own modules (to register or re-export them) is how a package
    # is made, not a circle between concerns.
    graph = {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in graph.items()}
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_clis_keep_their_names():
    for cli in ("train", "evaluate", "benchmark"):
        assert os.path.exists(os.path.join(ROOT, cli, "__main__.py"))
    assert os.path.exists(os.path.join(ROOT, "export.py"))


def test_evaluation_names_no_dataset():
    """What a dataset offers evaluation comes from its source's registration (clip_jax.input.catalog):
    no file under clip_jax/evaluate names the built-in dataset."""
    folder = os.path.join(ROOT, "evaluate")
    named = []
    for where, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(where, name)
                named += [f"{os.path.relpath(path, ROOT)}:{i}" for i, line in enumerate(open(path), 1)
                          if re.search(r"\bshapes", line, re.IGNORECASE)]  # not batch_shapes, variable_shapes
    assert os.path.isdir(os.path.join(folder, "tasks")) and not named, named


def test_nothing_outside_the_input_imports_its_private_names():
    """Training, evaluation and adaptation read records through the input's public reader (one spec, one
    parse), not through its helpers."""
    bad = [f"{module} -> {target}" for module, targets in imports().items() if not _in(module, "clip_jax.input")
           for target in targets if _in(target, "clip_jax.input") and target.rsplit(".", 1)[-1].startswith("_")]
    assert not bad, "\n".join(sorted(bad))


def test_adaptation_and_the_trainers_input_name_no_dataset_and_no_input_op():
    """The dataset's knowledge comes from its registration in clip_jax/input/; which batch keys the input
    makes, from the method's declaration: the adaptation names no built-in dataset, and the trainer
    names neither a dataset nor an op's batch key."""
    found = []
    for folder, words in ((os.path.join(ROOT, "adapt"), r"\bshapes\b"),
                          (os.path.join(ROOT, "train"), r"\bimage_views\b|\bviews\s*=")):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                text = open(os.path.join(folder, name)).read()
                found += [f"{folder}/{name}: {m.group(0)!r}" for m in re.finditer(words, text)]
    assert not found, "\n".join(found)


def test_nothing_outside_the_input_names_the_embedded_dataset():
    """The shapes dataset's knowledge (splits, sizes, labels, prompts) sits in clip_jax/input/, behind the
    source registrations: no other module names it ('shapes:SPLIT', a shapes_* setting, 'shapes')."""
    named = re.compile(r"\bshapes([:_\"'])|['\"]shapes\b|\bshapes (dataset|records)")
    found = []
    for where, _, files in os.walk(ROOT):
        if os.path.relpath(where, ROOT).split(os.sep)[0] == "input":
            continue
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(where, name)
                found += [f"{os.path.relpath(path, ROOT)}:{i}" for i, line in enumerate(open(path), 1)
                          if named.search(line)]
    assert not found, found


def test_the_test_only_references_are_imported_in_functions_only():
    """torch, open_clip, CLIP_benchmark and webdataset are no dependencies of the package (tests/references.txt):
    a module that runs one (clip_jax.evaluate.clip_benchmark) imports it inside the function that needs it."""
    references = ("torch", "open_clip", "clip_benchmark", "webdataset", "cn_clip", "transformers")
    found = []
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                for node in ast.parse(open(path).read()).body:
                    named = ([a.name for a in node.names] if isinstance(node, ast.Import)
                             else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                    found += [f"{os.path.relpath(path, ROOT)}: {n}" for n in named if n.split(".")[0] in references]
    assert not found, found
