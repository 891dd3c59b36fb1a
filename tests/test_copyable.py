"""prototypes.py, cutmix.py and model.py can be copied into another project on their own:
each file, alone in an empty folder, runs the usage example of its module docstring in a
fresh interpreter that cannot import the rest of this repository."""
import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPO_MODULES = sorted(path.stem for path in ROOT.glob("*.py"))
ALLOWED = {"prototypes.py": {"torch"}, "cutmix.py": {"torch"}, "model.py": {"torch", "torchvision"}}

# Runs in the empty folder: no other module of the repository may be importable, then the
# module docstring's >>> examples run as a doctest; exit 1 if there are none or one fails.
RUN_EXAMPLE = """
import doctest, importlib, importlib.util, sys
name, others = sys.argv[1], sys.argv[2:]
found = [other for other in others if importlib.util.find_spec(other) is not None]
if found:
    sys.exit(f"the repository is importable here: {found}")
module = importlib.import_module(name)
test = doctest.DocTestParser().get_doctest(module.__doc__ or "", vars(module).copy(), name,
                                           module.__file__, 0)
if not test.examples:
    sys.exit(f"{name}: no >>> usage example in the module docstring")
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
runner.run(test)
sys.exit(1 if runner.summarize(verbose=False).failed else 0)
"""


def top_level_imports(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def is_standard_library(name):
    if name in getattr(sys, "stdlib_module_names", ()):  # Python 3.10 and newer
        return True
    spec = importlib.util.find_spec(name)
    origin = (spec.origin or "") if spec is not None else None
    return origin is not None and (origin in ("built-in", "frozen") or (
        origin.startswith(sysconfig.get_paths()["stdlib"]) and "site-packages" not in origin))


@pytest.mark.parametrize("filename", sorted(ALLOWED))
def test_imports_only_torch_and_the_standard_library(filename):
    imports = top_level_imports(ROOT / filename)
    others = {name for name in imports - ALLOWED[filename] if not is_standard_library(name)}
    assert not others, f"{filename} imports {sorted(others)}"


@pytest.mark.parametrize("filename", sorted(ALLOWED))
def test_the_file_alone_runs_its_usage_example(filename, tmp_path):
    shutil.copy(ROOT / filename, tmp_path / filename)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(OMP_NUM_THREADS="1")
    name = Path(filename).stem
    others = [module for module in REPO_MODULES if module != name]
    done = subprocess.run([sys.executable, "-c", RUN_EXAMPLE, name, *others], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_file_that_imports_the_repository_fails(tmp_path, monkeypatch):
    """The check above fails for a file that needs another module of the repository."""
    source = (ROOT / "cutmix.py").read_text().replace("\nimport torch\n", "\nimport torch\nimport train\n", 1)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "repo")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "cutmix.py").write_text(source)
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    with pytest.raises(AssertionError, match="No module named 'train'"):
        test_the_file_alone_runs_its_usage_example("cutmix.py", copy_dir)
