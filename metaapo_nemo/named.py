"""Functions a config names as ``module:function`` (a rule reward, an evaluation).

The library never imports the demo and benchmark tasks; a config reaches them, or a user's
own code, by name: ``reward.callable: tasks.toy_rules:score``. Names resolve like
``python -m`` would resolve them, so they work whatever script started the run:

1. the module as it stands on ``sys.path`` (installed packages, the script's directory);
2. if its top-level package is not found there: the current directory, then the source
   checkout that holds ``metaapo_nemo/`` (where ``tasks/`` lives beside ``recipes/``).
   The first of these that has the package is appended to ``sys.path`` (appended, so an
   installed package of the same name always wins).

Every failure is a `ConfigError` that names the config key, what was asked and what exists,
raised when the run is built (start-up), never at the first call.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from metaapo_nemo.config.schema import ConfigError

#: The directory that holds the package: the repository root in a source checkout.
CHECKOUT_ROOT = Path(__file__).resolve().parents[1]


def search_roots() -> list[Path]:
    """Where a module that is not on ``sys.path`` is looked for, in order."""
    return [Path.cwd(), CHECKOUT_ROOT]


def _has_package(root: Path, top: str) -> bool:
    return (root / top / "__init__.py").is_file() or (root / f"{top}.py").is_file()


def import_module(name: str) -> ModuleType:
    """``importlib.import_module`` plus the search roots for a top-level package not found.

    Raises:
        ImportError: The module (or something it imports) cannot be imported.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        top = name.partition(".")[0]
        if exc.name != top:  # the package exists; a submodule or a dependency is missing
            raise
        for root in search_roots():
            if _has_package(root, top):
                if str(root) not in sys.path:
                    sys.path.append(str(root))
                return importlib.import_module(name)
        raise


def load_callable(spec: str, key: str) -> Callable[..., Any]:
    """The function named by ``spec`` (``module:function``; ``function`` may be dotted).

    Args:
        spec: The name, e.g. ``"tasks.toy_rules:score"``.
        key: The config key it came from, for the message (``"reward.callable"``).

    Raises:
        ConfigError: Bad format, a module that cannot be imported, a missing attribute
            (the module's public functions are listed) or something not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"{key}={spec!r} must look like 'module:function', e.g. 'tasks.toy_rules:score'"
        )
    try:
        module = import_module(module_name)
    except ImportError as exc:
        where = ", ".join(str(r) for r in search_roots())
        raise ConfigError(
            f"{key}={spec!r}: cannot import module {module_name!r} "
            f"({type(exc).__name__}: {exc}); looked on sys.path, then in {where}"
        ) from exc
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            found = sorted(
                n for n, v in vars(module).items() if not n.startswith("_") and inspect.isfunction(v)
            )
            raise ConfigError(
                f"{key}={spec!r}: module {module_name!r} has no attribute {attr!r}; "
                f"its functions: {', '.join(found) or 'none'}"
            )
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"{key}={spec!r} names a {type(fn).__name__}, not a function")
    return fn
