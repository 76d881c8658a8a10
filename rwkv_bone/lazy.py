"""Packages whose heavy names load on first use, so that every CLI's --help (and the light helpers
next to them) answer without importing torch."""
from __future__ import annotations

import importlib
import sys
import types
from typing import Mapping


def lazy_package(package: str, names: Mapping[str, str]) -> None:
    """Make the attributes `names` ({attribute: submodule defining it, relative to `package`}) of
    the already imported package `package` load on first use.

    An attribute named like the submodule that defines it (train.run, eval.evaluate) stays the
    function once the submodule is loaded, as an eager `from .run import run` would have left it:
    the import system sets the package's attribute to the submodule, and the package keeps the
    function instead."""
    names = dict(names)

    class LazyPackage(types.ModuleType):
        def __getattr__(self, name: str):
            if name not in names:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            # Not cached here: a value the submodule computes when read (registry.METHODS) stays live.
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)

        def __setattr__(self, name: str, value: object) -> None:
            if isinstance(value, types.ModuleType) and names.get(name) == name:
                value = getattr(value, name)
            super().__setattr__(name, value)

    sys.modules[package].__class__ = LazyPackage


__all__ = ["lazy_package"]
