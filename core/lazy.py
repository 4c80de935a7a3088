"""Package attributes imported on first use (PEP 562), shared by the packages' ``__init__``.

Our own ten lines rather than scientific-python's ``lazy_loader``: a dependency for this alone
is not worth it, and ``lazy_loader``'s stub-file mode would add a ``.pyi`` per package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]], public: list[str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: each name in ``exports`` (defining module -> its
    names) is imported from its module when first read, so ``import package`` stays light (no torch,
    no Ray). ``public``: the package's ``__all__``.

    Raises (from ``__getattr__``):
        AttributeError: a name that is neither exported nor defined in the package.
    """

    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(public))

    return __getattr__, __dir__
