"""Load a recipe YAML (with ``defaults:`` inheritance) plus ``a.b=c`` overrides into a Config.

Order of precedence, lowest first: schema defaults, each ``defaults:`` entry in list order
(each resolved recursively the same way), the file's own keys, then command-line overrides.
Mappings merge deeply; lists and scalars replace. ``defaults`` entries are paths relative to
the repo's ``conf/`` directory (falling back to the including file's directory), so a recipe
can inherit from ``base/`` partials or from another recipe.

Every key is checked against the schema before pydantic sees it, so a typo fails with its
source (file or override) and the nearest valid keys. Pydantic's errors are re-raised as one
``ConfigError`` listing each bad key, its value and the reason.
"""

from __future__ import annotations

import difflib
import functools
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from metaapo_nemo.config.schema import METAAPO_SECTIONS, RECIPES, Config, ConfigError, RolloutConfig, fmt

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
# Each method's default config (its recipe run with no --config): the tiny CPU demos.
DEFAULT_RECIPES = {"dpo": CONF_DIR / "tiny_cpu_dpo.yaml", "metaapo": CONF_DIR / "tiny_cpu.yaml"}
DEFAULT_RECIPE = DEFAULT_RECIPES["metaapo"]  # the project's main job (`make demo`)

_FLOAT = re.compile(  # YAML 1.2 floats: PyYAML alone reads 1e-5 (no dot) as a string
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_FLOAT_TAG = "tag:yaml.org,2002:float"
_DROPPED_TAGS = (_FLOAT_TAG, "tag:yaml.org,2002:timestamp")  # dates stay strings


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float (as OmegaConf does) and dates as strings."""


_YamlLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in _DROPPED_TAGS]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _ch in "-+0123456789.":
    _YamlLoader.yaml_implicit_resolvers.setdefault(_ch, []).append((_FLOAT_TAG, _FLOAT))


def display_path(path: Path) -> str:
    """Show ``path`` relative to the repo root when it lies inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def resolve_repo_path(path: str | Path) -> Path:
    """Resolve a config path: absolute, else relative to the cwd if it exists, else the repo.

    Recipes write repo-relative paths (``data.path``); this lets runs start from any cwd.
    """
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


# ---------------------------------------------------------------- schema keys and typos


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside ``annotation`` (``X`` or ``X | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


@functools.cache
def schema_paths(model: type[BaseModel] = Config) -> dict[str, bool]:
    """Every dotted key of the schema, in schema order, mapped to "is a section"."""
    paths: dict[str, bool] = {}
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        paths[name] = sub is not None
        if sub is not None:
            paths.update({f"{name}.{k}": v for k, v in schema_paths(sub).items()})
    return paths


def suggest_keys(key: str, n: int = 5) -> list[str]:
    """Closest valid dotted keys to ``key``, matching on the full path and on the leaf name."""
    leaf = key.rsplit(".", 1)[-1]
    parts = key.split(".")
    ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}  # valid, not helpful
    scored = []
    for path in schema_paths():
        if path in ancestors:
            continue
        path_leaf = path.rsplit(".", 1)[-1]
        score = max(
            difflib.SequenceMatcher(None, key, path).ratio(),
            difflib.SequenceMatcher(None, leaf, path_leaf).ratio(),
        )
        if min(len(leaf), len(path_leaf)) >= 2 and (
            leaf.startswith(path_leaf) or path_leaf.startswith(leaf)
        ):
            score = max(score, 0.85)
        if score >= 0.6:
            scored.append((-score, path))
    return [path for _, path in sorted(scored)[:n]]


def _unknown_key_message(key: str, source: str) -> str:
    msg = f"unknown config key '{key}' ({source})"
    close = suggest_keys(key)
    if close:
        return f"{msg}; did you mean: {', '.join(close)}"
    parent = key.rpartition(".")[0]
    siblings = [p for p in schema_paths() if p.rpartition(".")[0] == parent]
    where = f"under '{parent}'" if parent else "at the top level"
    return f"{msg}; valid keys {where}: {', '.join(siblings) or 'none'}"


def check_keys(tree: Mapping, source: str, prefix: str = "") -> None:
    """Raise ConfigError naming every key in ``tree`` that the schema does not have.

    Args:
        tree: Nested mapping as read from YAML or an override.
        source: Where it came from, e.g. ``"in conf/tiny_cpu.yaml"``.
        prefix: Dotted path of ``tree`` inside the config.
    """
    unknown: list[str] = []
    _collect_unknown(tree, prefix, unknown)
    if unknown:
        raise ConfigError("\n".join(_unknown_key_message(k, source) for k in unknown))


def _collect_unknown(tree: Mapping, prefix: str, out: list[str]) -> None:
    paths = schema_paths()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if path not in paths:
            out.append(path)
        elif paths[path] and isinstance(value, Mapping):
            _collect_unknown(value, f"{path}.", out)


# ---------------------------------------------------------------- files and inheritance


def _recipes_listing() -> str:
    files = sorted(CONF_DIR.rglob("*.yaml"))
    recipes = [display_path(p) for p in files if "base" not in p.relative_to(CONF_DIR).parts]
    partials = [display_path(p) for p in files if display_path(p) not in recipes]
    text = ", ".join(recipes) or f"(none found in {CONF_DIR})"
    return text + (f" (partials for defaults: {', '.join(partials)})" if partials else "")


def _find_recipe(path: str | Path) -> Path:
    """Locate the top-level recipe: as given, then under the repo root, then under conf/."""
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [given, REPO_ROOT / given, CONF_DIR / given]
    candidates += [c.with_name(c.name + ".yaml") for c in candidates if c.suffix != ".yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"config file not found: {path}; recipes in conf/: {_recipes_listing()}")


def _find_default(entry: str, including: Path) -> Path:
    """Locate a ``defaults`` entry: repo conf/ first, then the including file's directory."""
    rel = Path(entry).expanduser()
    names = [rel] if rel.suffix == ".yaml" else [rel, rel.with_name(rel.name + ".yaml")]
    for root in (CONF_DIR, including.parent):
        for name in names:
            candidate = name if name.is_absolute() else root / name
            if candidate.is_file():
                return candidate.resolve()
    raise ConfigError(
        f"defaults entry '{entry}' in {display_path(including)} not found (looked in "
        f"{display_path(CONF_DIR)}/ and {display_path(including.parent)}/); "
        f"recipes in conf/: {_recipes_listing()}"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML file into a dict; malformed YAML fails with the file and line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {display_path(path)}: {exc}") from None
    try:
        data = yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"malformed YAML in {display_path(path)}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{display_path(path)} must hold a mapping at the top level, got "
            f"{type(data).__name__}"
        )
    return data


def deep_merge(base: Mapping, top: Mapping) -> dict[str, Any]:
    """Merge ``top`` over ``base``: mappings merge recursively, everything else replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_tree(path: Path, stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read ``path`` with its ``defaults`` resolved recursively, merged in list order."""
    if path in stack:
        chain = " -> ".join(display_path(p) for p in (*stack, path))
        raise ConfigError(f"defaults cycle: {chain}; remove one of these defaults entries")
    data = read_yaml(path)
    defaults = data.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(
            f"defaults in {display_path(path)} must be a list of file paths, got {defaults!r}"
        )
    check_keys(data, f"in {display_path(path)}")
    merged: dict[str, Any] = {}
    for entry in defaults:
        merged = deep_merge(merged, _load_tree(_find_default(entry, path), (*stack, path)))
    return deep_merge(merged, data)


# ---------------------------------------------------------------- overrides and validation


def _apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides with OmegaConf dotlist semantics, then resolve ``${...}``."""
    conf = OmegaConf.create(tree)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' must look like key=value, e.g. optim.lr=1e-4")
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, yaml.YAMLError) as exc:  # e.g. a value starting with '@'
            why = str(exc).splitlines()[0]
            raise ConfigError(f"cannot parse override '{item}': {why}; quote the value, e.g. "
                              f"{key}='\"...\"'") from None
        check_keys(parsed, f"from override '{item}'")
        conf.merge_with_dotlist([item])
    try:
        return OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve interpolation: {exc}") from None


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors(include_url=False):
        key = ".".join(str(part) for part in err["loc"])
        msg = err["msg"].removeprefix("Value error, ").replace("\n", "\n    ")
        value = err.get("input")
        if err["type"] == "missing":
            lines.append(f"  - {key}: required, not set")
        elif err["type"] == "value_error" or isinstance(value, (Mapping, list)):
            lines.append(f"  - {msg}")  # validator messages already name their keys
        else:
            lines.append(f"  - {key}={fmt(value)}: {msg}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), method: str | None = None
) -> Config:
    """Load, merge, override and validate a recipe.

    Args:
        path: Recipe YAML; None means the method's default (``DEFAULT_RECIPES``: DPO
            conf/tiny_cpu_dpo.yaml, MetaAPO conf/tiny_cpu.yaml, the latter also when no
            method is given). Relative paths are tried against the cwd, the repo root and conf/.
        overrides: ``a.b=c`` strings; values are parsed as YAML (``1e-5`` float, ``true``
            bool, ``null`` None, ``[1,2]`` list).
        method: The method of the recipe that runs the config ("dpo" or "metaapo"). It
            sets ``method``; a config that states another one is refused. None: the config
            must state its ``method``.

    Returns:
        The validated ``Config``.

    Raises:
        ConfigError: Missing file, malformed YAML, defaults cycle, unknown key (with the
            nearest valid keys), a method the recipe does not run, or invalid values (each
            key, value and reason; a key the method would ignore is one of them).
    """
    if method is not None and method not in RECIPES:
        raise ConfigError(f"unknown method {method!r}; one of {', '.join(RECIPES)}")
    default = DEFAULT_RECIPES[method or "metaapo"]
    recipe = _find_recipe(default if path is None else path)
    tree = _apply_overrides(_load_tree(recipe), list(overrides))
    source = display_path(recipe) + "".join(f" {o}" for o in overrides)
    tree["method"] = _resolve_method(tree.get("method"), method, display_path(recipe))
    try:
        return Config.model_validate(tree, context={"source": display_path(recipe)})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def stated_method(path: str | Path) -> Any:
    """The ``method`` a recipe YAML states, itself or through its ``defaults`` (None: none),
    without validating the rest (``metaapo-nemo train`` picks the method with it).

    Raises:
        ConfigError: Missing file, malformed YAML or a defaults cycle.
    """
    return _load_tree(_find_recipe(path)).get("method")


def _resolve_method(stated: Any, method: str | None, recipe: str) -> Any:
    """The config's method: the recipe's, which a stated ``method`` must equal."""
    if method is None:
        if stated is None:
            raise ConfigError(
                f"{recipe} states no method: add `method: dpo` (the offline family, "
                f"{RECIPES['dpo']}) or `method: metaapo` ({RECIPES['metaapo']}) to it, or run it "
                "with one of those recipes"
            )
        return stated  # the schema checks the value
    if stated is not None and stated in RECIPES and stated != method:
        other = RECIPES[stated]
        raise ConfigError(
            f"{recipe} runs method={fmt(stated)} ({other}), but {RECIPES[method]} runs "
            f"method={method}: run it with {other}, or give {RECIPES[method]} a {method} config "
            f"(e.g. {display_path(DEFAULT_RECIPES[method])})"
        )
    return stated if stated is not None else method  # a bad stated value: the schema says so


def to_yaml(cfg: Config) -> str:
    """Dump the resolved config as YAML, keys in schema order; ``load_config`` reads it back.

    Sections the method does not have are left out; an offline config keeps only the
    engine keys of ``rollout`` (what its `eval` engine reads).
    """
    data = cfg.model_dump(mode="json")
    for name in METAAPO_SECTIONS:
        if data[name] is None:
            del data[name]
    if cfg.method != "metaapo" and "rollout" in data:
        data["rollout"] = {k: v for k, v in data["rollout"].items() if k in RolloutConfig.ENGINE_KEYS}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
