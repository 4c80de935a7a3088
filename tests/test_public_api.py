"""Each package's public API is explicit (``__all__``) and is what the other packages use; the README and the
pages under ``docs/`` name only what exists."""

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "labeler", "pipeline", "trainer")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# calls written in the pages that are not the project's: the paper's, torch's, Ray's, the reference code's
NOT_OURS = {"softmax", "DataLoader", "FailureConfig", "CheckpointConfig", "get_dataset_shard", "floor", "RunConfig",
            "ActorPoolStrategy", "remove_node", "AutoscalingCluster", "map_batches"}  # fmt: skip


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


def _imports_across_packages():
    """(importing file, imported package, module, name) for every import of another package's name, at
    module level or inside a function."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    target = node.module.split(".")[0]
                    if target in PACKAGES and target != package:
                        for alias in node.names:
                            yield path.relative_to(ROOT), target, node.module, alias.name
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        target = alias.name.split(".")[0]
                        if target in PACKAGES and target != package and alias.name != target:
                            yield path.relative_to(ROOT), target, alias.name, "(the whole module)"


def test_packages_use_only_each_others_public_names():
    """A name one package imports from another is in that package's ``__all__``: everything else is private."""
    found = list(_imports_across_packages())
    assert found, "the scan found no import across packages"
    public = {p: set(importlib.import_module(p).__all__) for p in PACKAGES}
    private = sorted(f"{path}: {module}.{name}" for path, target, module, name in found if name not in public[target])
    assert private == [], "names used across packages but missing from the package's __all__"


def test_pages_name_only_what_exists():
    text = "\n".join(page.read_text() for page in PAGES)
    dotted = set(re.findall(r"`((?:core|labeler|pipeline|trainer)(?:\.\w+)+)", text))
    files = set(re.findall(r"`((?:core|labeler|pipeline|trainer|benchmarks|tests)/[\w/]+\.py)", text))
    calls = set(re.findall(r"`(\w+)\(", text)) - NOT_OURS
    assert dotted and files and calls
    for name in sorted(dotted):
        _resolve(name)  # raises naming what is missing
    assert [f for f in sorted(files) if not (ROOT / f).exists()] == []
    public = {n for p in PACKAGES for n in importlib.import_module(p).__all__}
    assert sorted(calls - public) == []


def test_readme_links_reach_files():
    """The README is read on the repository's front page, outside the docs build: its links must lead somewhere."""
    links = re.findall(r"\]\(((?!https?://|#)[^)#]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    assert links and [link for link in links if not (ROOT / link).exists()] == []


def test_importing_the_packages_stays_light():
    """``import core, labeler, pipeline, trainer`` imports neither torch nor Ray: public names load on first use."""
    import subprocess
    import sys

    code = "import sys, core, labeler, pipeline, trainer; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
