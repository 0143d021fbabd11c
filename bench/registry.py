"""The method registry is the config group: a method exists if ``method/<name>.yaml`` exists in the
config search path (``bench/conf``, plus ``--config-dir`` or ``hydra.searchpath`` folders); ``<name>``
is its label everywhere. This module lists the names, reads their tags, fills class defaults into a
config, loads and builds one method, and checks the group's conventions (``python -m bench.registry``).

A method config holds ``_target_`` and its keyword arguments, each with its value or with
``${default:}``: the class's default for that argument, read from the signature of ``_target_``
when the config is resolved, so a default value is written once (in the class, with its one-line
comment) while the key stays in the config: overridable as ``method.<key>=...`` and part of the
run's hash exactly as when the value was written out. A variant extends its base through hydra's
defaults list (``defaults: [obs_diff, _self_]``, the base's file in the same group, merged into the
same package) and holds only what differs; ``${default:}`` then resolves against the variant's own
``_target_``.

A comment line ``# tags: default_suite, default_suite_unet`` puts a method in the sweep of every
experiment whose ``hydra.sweeper.params.method`` is ``${tagged:<tag>}``. Tags are the file's own
(a variant is in no suite its base is in unless its file says so) and never part of the composed
config: not passed to the class, not hashed. Both resolvers are registered in bench/__init__.py.
"""
from __future__ import annotations

import copy
import functools
import importlib
import inspect
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

CONF = Path(__file__).resolve().parent / "conf"
GROUP = "method"
TAGS = re.compile(r"^#\s*tags:(.*)$", re.M)   # "# tags: a, b" in a method file
TAGGED = "tagged"                             # ${tagged:<tag>} in an experiment's sweeper params


# --------------------------------------------------------------------------------------------
# Names and tags: the files of the config group
# --------------------------------------------------------------------------------------------

def _root_dir(sp: str) -> Path | None:
    """The folder of a hydra search path entry: ``file://dir``, ``pkg://module`` or a plain folder."""
    import importlib.resources

    if sp.startswith("pkg://"):
        try:
            return Path(str(importlib.resources.files(sp[len("pkg://"):].strip("/").replace("/", "."))))
        except (ModuleNotFoundError, TypeError):
            return None
    if sp.startswith("structured://"):
        return None
    return Path(sp[len("file://"):] if sp.startswith("file://") else sp)


def _group_dirs(searchpath: Iterable[str] = ()) -> list[Path]:
    """``method/`` folders: bench/conf's, then those of the running hydra's search path (its
    ``--config-dir``), then those of `searchpath` (a config's ``hydra.searchpath``)."""
    from hydra.core.global_hydra import GlobalHydra

    entries = []
    if GlobalHydra.instance().is_initialized():
        entries = [f"{s.scheme()}://{s.path}" for s in GlobalHydra.instance().config_loader().get_sources()]
    roots = [CONF] + [r for r in map(_root_dir, [*entries, *map(str, searchpath)]) if r is not None]
    out: list[Path] = []
    for r in roots:
        d = (r / GROUP).resolve()
        if d not in out:
            out.append(d)
    return out


def _files(searchpath: Iterable[str] = ()) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for d in _group_dirs(searchpath):
        for p in sorted(d.glob("*.yaml")) if d.is_dir() else ():
            out.setdefault(p.stem, p)  # the first folder holding a name wins, as in hydra
    return out


def names(searchpath: Iterable[str] = ()) -> list[str]:
    """Every method label, sorted."""
    return sorted(_files(searchpath))


def config_file(name: str, searchpath: Iterable[str] = ()) -> Path:
    from bench.api import BenchError

    files = _files(searchpath)
    if name not in files:
        raise BenchError(f"method={name!r} has no config; available: {', '.join(sorted(files))} "
                         f"(add bench/conf/method/{name}.yaml)")
    return files[name]


def _file_tags(path: Path) -> list[str]:
    return [t for line in TAGS.findall(path.read_text()) for t in re.split(r"[\s,]+", line.strip()) if t]


def tags(name: str, searchpath: Iterable[str] = ()) -> list[str]:
    """The tags of the method's own file (``# tags: a, b``)."""
    return _file_tags(config_file(name, searchpath))


def tagged(tag: str, searchpath: Iterable[str] = ()) -> list[str]:
    """The methods whose file lists ``tag``, sorted."""
    return [n for n, p in sorted(_files(searchpath).items()) if tag in _file_tags(p)]


def sweep_choices(tag: str, root=None) -> str:
    """``${tagged:<tag>}``: the tagged methods as the sweeper's comma-separated choices, found in
    bench/conf, the running hydra's search path and the config's own ``hydra.searchpath``."""
    from omegaconf import OmegaConf

    sp = OmegaConf.select(root, "hydra.searchpath", default=None) if root is not None else None
    found = tagged(tag, list(sp or ()))
    if not found:
        from bench.api import BenchError
        raise BenchError(f"no method config is tagged {tag!r} (add the line `# tags: {tag}` to "
                         "bench/conf/method/<name>.yaml)")
    return ",".join(found)


# --------------------------------------------------------------------------------------------
# Class defaults: ${default:}
# --------------------------------------------------------------------------------------------

def method_class(target: Any):
    """The bench.api.Method subclass `_target_` names, or None when it names none (bench.run's
    make_method then says what is wrong, in one line)."""
    from bench.api import Method

    if not isinstance(target, str) or "." not in target:
        return None
    module, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except Exception:  # a missing module or attribute, or a module that does not import
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Method) else None


def _plain(v: Any):
    """`v` as config data (tuples as lists), or raise TypeError when it is not plain data."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping) and all(isinstance(k, str) for k in v):
        return {k: _plain(x) for k, x in v.items()}
    raise TypeError(type(v).__name__)


@functools.lru_cache(maxsize=None)
def _defaults(cls) -> dict[str, Any]:
    out = {}
    for n, p in inspect.signature(cls.__init__).parameters.items():
        if n == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        try:
            out[n] = _plain(p.default)
        except TypeError:  # not config data (an object): a config cannot name it by ${default:}
            continue
    return out


def class_defaults(cls) -> dict[str, Any]:
    """Keyword arguments of ``cls.__init__`` with a plain-data default (tuples as lists), in order."""
    return copy.deepcopy(_defaults(cls))


def class_default(_parent_, _node_) -> Any:
    """``${default:}``: the default of this key in the signature of the enclosing config's
    ``_target_``. None when there is none (a ``_target_`` that names no Method, a key the class does
    not take): the run's own checks then refuse the config by name, in one line (bench.checks,
    bench.run.make_method); ``python -m bench.registry`` names it too."""
    cls = method_class(_parent_.get("_target_"))
    key = _node_._key()
    d = _defaults(cls) if cls is not None else {}
    return copy.deepcopy(d[key]) if key in d else None


# --------------------------------------------------------------------------------------------
# One method, without a run
# --------------------------------------------------------------------------------------------

def load(name: str, seed: int = 0, searchpath: Iterable[str] = ()) -> dict:
    """One method's resolved config, composed by hydra on its own (its defaults list followed) with
    the run's ``seed``; interpolations into the rest of a run config (``${oc.select:eval.steps,25}``)
    take their fallbacks. What tests and scripts build a method from without a run (``build``)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf import OmegaConf

    config_file(name, searchpath)  # an unknown name: one line listing the known ones
    over = [f"+{GROUP}={name}", f"+seed={seed}"]
    if searchpath:
        over.append(f"hydra.searchpath=[{','.join(searchpath)}]")
    backup = get_gh_backup()  # a running hydra app (or a test's) gets its own state back
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="bench.conf", version_base="1.3"):
            cfg = compose(overrides=over)
    finally:
        restore_gh_from_backup(backup)
    return OmegaConf.to_container(cfg, resolve=True)[GROUP]


def build(name: str, overrides: Mapping | None = None, seed: int = 0, searchpath: Iterable[str] = ()):
    """The method `name` built from its config with `overrides` (keyword arguments) on top, as
    bench.run builds it (without the run's checks: bench.run.make_method)."""
    from hydra.utils import instantiate

    return instantiate({**load(name, seed, searchpath), **(overrides or {})}, _convert_="all")


# --------------------------------------------------------------------------------------------
# Lint: the config group's conventions, checked
# --------------------------------------------------------------------------------------------

def _experiment_tags(searchpath: Iterable[str] = ()) -> set[str]:
    """Tags that some experiment's sweep asks for (``${tagged:<tag>}`` in its text)."""
    found = set()
    for d in _group_dirs(searchpath):
        for p in sorted((d.parent / "experiment").glob("*.yaml")):
            found |= set(re.findall(r"\$\{" + TAGGED + r":\s*([\w.-]+)\s*\}", p.read_text()))
    return found


def lint(searchpath: Iterable[str] = ()) -> list[str]:
    """One line per breach of the config group's conventions: a ``_target_`` that names no Method,
    ``${default:}`` on a key the class gives no default, a tag no experiment sweeps, and a value
    written twice (a literal equal to the class default: write ``${default:}``; a key of a variant
    equal to its base's value: delete it)."""
    from omegaconf import OmegaConf

    searchpath = list(searchpath)
    swept = _experiment_tags(searchpath)
    out = []
    for name, path in _files(searchpath).items():
        where = f"method/{name}.yaml"
        out += [f"{where}: tagged {t!r}, which no experiment sweeps (known: {', '.join(sorted(swept))})"
                for t in _file_tags(path) if t not in swept]
        m = load(name, searchpath=searchpath)
        cls = method_class(m.get("_target_"))
        if cls is None:
            out.append(f"{where}: _target_={m.get('_target_')!r} is not an importable bench.api.Method subclass")
            continue
        defaults = _defaults(cls)
        raw = OmegaConf.to_container(OmegaConf.load(path))  # this file's own lines, unresolved
        bases = [b for b in raw.get("defaults") or [] if isinstance(b, str) and b != "_self_"]
        base = {k: v for b in bases for k, v in load(b, searchpath=searchpath).items()}
        for k, v in raw.items():
            if k.startswith("_") or k == "defaults":
                continue
            if v == "${default:}":
                if k not in defaults:
                    out.append(f"{where}: {k}: ${{default:}}, but {cls.__name__} has no plain default for {k!r}")
            elif isinstance(v, str) and "${" in v:
                continue
            elif k in base and _same(base[k], v):
                out.append(f"{where}: {k}={v!r} repeats {'/'.join(bases)}'s value; delete the line")
            elif k in defaults and _same(defaults[k], v):
                out.append(f"{where}: {k}={v!r} is {cls.__name__}'s default; write {k}: ${{default:}}")
    return out


def _same(a, b) -> bool:
    """Equal as a run hashes them (JSON: 1 and 1.0, True and 1 differ)."""
    import json
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def main() -> None:
    """``python -m bench.registry``: every method with its class and tags, then lint's findings."""
    import sys

    for n in names():
        print(f"{n:24s} {load(n).get('_target_', '?'):45s} {', '.join(tags(n))}")
    problems = lint()
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
