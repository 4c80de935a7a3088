"""Each package's public API is explicit (``__all__``), and the README names only what exists."""

import importlib
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
PACKAGES = ("labeler", "pipeline", "trainer")


def _resolve(dotted: str):
    """The object a dotted name (``package.module.attr``) names; raises when there is none."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__ == sorted(set(module.__all__))
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute"):
        module.no_such_name  # noqa: B018


def test_readme_names_only_what_exists():
    dotted = set(re.findall(r"`((?:labeler|pipeline|trainer)(?:\.\w+)+)", README))
    files = set(re.findall(r"`((?:labeler|pipeline|trainer|benchmarks|tests)/[\w/]+\.py)", README))
    calls = set(re.findall(r"`(\w+)\(", README)) - {
        "softmax",
        "DataLoader",
        "FailureConfig",
        "CheckpointConfig",
        "get_dataset_shard",
        "floor",
    }
    assert dotted and files and calls
    for name in sorted(dotted):
        _resolve(name)  # raises naming what is missing
    root = Path(__file__).resolve().parent.parent
    assert [f for f in sorted(files) if not (root / f).exists()] == []
    public = {n for p in PACKAGES for n in importlib.import_module(p).__all__}
    assert sorted(calls - public) == []


def test_importing_the_packages_stays_light():
    """``import labeler, pipeline, trainer`` imports neither torch nor Ray: public names load on first use."""
    import subprocess
    import sys

    code = "import sys, labeler, pipeline, trainer; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
