"""CI runs the README's test command, which installs the test-only references outside the package."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command_verbatim():
    blocks = re.findall(r"```bash\n(.*?)```", _read("README.md"), re.S)
    command = blocks[1].strip()  # the second command of the README: install and run the tests
    assert "pytest" in command and "-r tests/references.txt" in command and "--no-deps cn-clip" in command
    assert command in _read(".ci/run").splitlines()


def test_references_stay_out_of_the_package_dependencies():
    names = [re.split(r"[=<>\[ ]", line, maxsplit=1)[0] for line in _read("tests/references.txt").splitlines()
             if line.strip() and not line.startswith("#")]
    assert {"torch", "open-clip-torch", "transformers"} <= set(names)
    setup = _read("setup.py")
    for name in names + ["cn-clip", "open_clip"]:
        assert not re.search(rf"[\"']{re.escape(name)}\b", setup), f"{name} is a test-only reference, not a dependency"


def test_a_missing_reference_skips_here_and_fails_in_ci(tmp_path):
    import subprocess
    import sys

    (tmp_path / "test_probe.py").write_text(
        "from conftest import reference\n\ndef test_probe():\n    reference('clip_jax_no_such_reference')\n")
    outcomes = {}
    for ci in ("true", ""):
        env = {**os.environ, "CI": ci, "PYTHONPATH": os.path.join(ROOT, "tests")}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                               "-rsf", "test_probe.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
        outcomes[ci] = done.stdout
    assert "1 failed" in outcomes["true"] and "README's test command" in outcomes["true"], outcomes["true"]
    assert "1 skipped" in outcomes[""], outcomes[""]
