"""Old import paths kept working, with a DeprecationWarning that names the new home."""

from __future__ import annotations

import importlib
import warnings


def moved(module_name: str, names: dict[str, str]):
    """A module `__getattr__` (PEP 562) for names that moved out of `module_name`.

    Args:
      module_name: the old module (its `__name__`).
      names: old attribute name -> "new.module:new_name" (or "new.module" for the same name).
    """

    def __getattr__(name):
        if name not in names:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        target, _, new_name = names[name].partition(":")
        new_name = new_name or name
        warnings.warn(
            f"{module_name}.{name} moved to {target}.{new_name}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(target), new_name)

    return __getattr__
