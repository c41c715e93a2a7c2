"""Finding strategies: the built-ins, the ``clbench.strategies`` entry-point group, and references
``path/to/file.py:ClassName`` or ``package.module:ClassName``; ``a+b`` combines them.

A broken plugin is an error naming it; nothing ever falls back to another strategy.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pkgutil
import sys
import traceback
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from clbench import ClbenchError, did_you_mean
from clbench.strategy import REGISTRY, Composite, Strategy, hyperparameters, parse_value

ENTRY_POINT_GROUP = "clbench.strategies"


@dataclass(frozen=True)
class Found:
    cls: type[Strategy]
    origin: str  # "built-in", "entry point <module:attr>", "file <path>", "module <name>"


def registered() -> dict[str, Found]:
    """The built-ins (importing every module of ``clbench.strategies`` runs their ``@register``), and any
    class registered in this process by code that imported clbench."""
    package = importlib.import_module("clbench.strategies")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"clbench.strategies.{module.name}")
    return {name: Found(cls, "built-in" if cls.__module__.startswith("clbench.strategies.")
                        else f"registered by {cls.__module__}") for name, cls in REGISTRY.items()}


def builtins() -> list[str]:
    """``--strategies all``: every built-in method, naive (the baseline) first, the others by name; bounds out."""
    methods = [name for name, found in registered().items() if found.origin == "built-in" and not found.cls.bound]
    return sorted(methods, key=lambda name: (name != "naive", name))


@dataclass(frozen=True)
class Broken:
    """An entry point that could not be loaded; listed by `clbench strategies`, fatal only when asked for."""

    origin: str
    error: str


def _entry_points(name: str | None = None) -> list[Any]:
    found = entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in found if name is None or ep.name == name]


def _load_entry_point(ep: Any) -> Found:
    what = f"entry point {ep.name!r} ({ep.value})"
    cls = _checked(_load(ep.load, what), what)
    if ep.name != cls.name:
        raise ClbenchError(f"{what}: the class is registered as {cls.name!r}; the entry point must carry the same name")
    return Found(cls, f"entry point {ep.value}")


def from_entry_points() -> dict[str, Found | Broken]:
    """Every entry point of the group, each loaded on its own: one broken package breaks only its own name."""
    found: dict[str, Found | Broken] = {}
    for ep in _entry_points():
        try:
            found[ep.name] = _load_entry_point(ep)
        except ClbenchError as exc:
            found[ep.name] = Broken(f"entry point {ep.value}", str(exc))
    return found


def available() -> dict[str, Found | Broken]:
    """Every strategy that can be named on the command line, built-ins first, then the entry points; a broken
    entry point (or one that takes a name already in use) is listed as Broken beside the working ones."""
    found: dict[str, Found | Broken] = dict(registered())
    for name, item in from_entry_points().items():
        if name not in found or isinstance(item, Found) and item.cls is found[name].cls:
            found[name] = item  # the entry point is where an already imported class comes from
        else:
            error = item.error if isinstance(item, Broken) else f"uses the name of the {found[name].origin} strategy"
            found[f"{name} ({item.origin})"] = Broken(item.origin, error)
    return found


def find(reference: str) -> Found:
    """One strategy by name, ``file.py:Class`` or ``package.module:Class``. Entry points are loaded only
    for the name asked for."""
    if ":" in reference:
        return _from_reference(reference)
    found = registered()
    if reference in found:
        return found[reference]
    matches = _entry_points(reference)
    if matches:
        return _load_entry_point(matches[0])
    names = set(found) | {ep.name for ep in _entry_points()}
    raise ClbenchError(f"strategy {reference!r} not found" + did_you_mean(reference, names) +
                       f" (available: {', '.join(sorted(names))})")


def _from_reference(reference: str) -> Found:
    target, _, attr = reference.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ClbenchError(f"strategy plugin {reference!r}: file {path} not found")
        module = _load(lambda: _import_file(path), f"strategy plugin {reference!r}")
        origin = f"file {path}"
    else:
        module = _load(lambda: importlib.import_module(target), f"strategy plugin {reference!r}")
        origin = f"module {target}"
    if not hasattr(module, attr):
        raise ClbenchError(f"strategy plugin {reference!r}: {target} has no class {attr!r}")
    return Found(_checked(getattr(module, attr), f"strategy plugin {reference!r}"), origin)


def _import_file(path: Path) -> Any:
    """The module of a plugin file. A file already imported under any name (a built-in strategy given by its
    path, a file named twice) is that module: one file never becomes two modules registering twice."""
    registered()  # the built-ins are imported under their package names first
    resolved = path.resolve()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).name == resolved.name and Path(file).resolve() == resolved:  # name first: cheap
            return module
    name = f"clbench_plugin_{hashlib.sha1(str(resolved).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _load(thunk: Any, what: str) -> Any:
    try:
        return thunk()
    except ClbenchError as exc:
        raise ClbenchError(f"{what}: {exc}") from None
    except Exception as exc:  # a plugin's own import error, whatever it is
        raise ClbenchError(f"{what}: import failed{_where(exc)}: {type(exc).__name__}: {exc}") from None


def _where(exc: BaseException) -> str:
    """`` at file:line`` of the plugin's own statement that failed: the outermost frame that is neither
    clbench's loader nor importlib's (an error deep inside a library the plugin calls still names the plugin's
    line)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" at {exc.filename}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__
              and "importlib" not in f.filename and not f.filename.startswith("<frozen")]
    return f" at {frames[0].filename}:{frames[0].lineno}" if frames else ""


def _checked(obj: Any, what: str) -> type[Strategy]:
    if not (isinstance(obj, type) and issubclass(obj, Strategy)):
        raise ClbenchError(f"{what}: {obj!r} is not a subclass of clbench.strategy.Strategy")
    if not obj.__dict__.get("name"):  # not decorated with @register (a subclass's inherited name is not its own)
        obj.name = obj.__name__.lower()
        obj.description = obj.description or (obj.__doc__ or "").strip().split("\n")[0]
    return obj


def create(spec: str, options: dict[str, Any]) -> tuple[Strategy, dict[str, Any]]:
    """Build ``a`` or ``a+b+…`` with ``options`` {"a.param": value}; returns it and every resolved option."""
    parts = [find(ref.strip()) for ref in spec.split("+")]
    names = [p.cls.name for p in parts]
    if len(set(names)) != len(names):
        raise ClbenchError(f"--strategy {spec}: {sorted(n for n in names if names.count(n) > 1)[0]!r} appears twice")
    if len(parts) > 1:
        for part in parts:
            if part.cls.not_combinable:
                raise ClbenchError(f"--strategy {spec}: {part.cls.name!r} cannot be combined: {part.cls.not_combinable}")
    _check_option_owners(spec, names, options)
    instances, resolved = [], {}
    for part in parts:
        params = hyperparameters(part.cls)
        given = {key.split(".", 1)[1]: value for key, value in options.items() if key.split(".", 1)[0] == part.cls.name}
        for key in given:
            if key not in params:
                raise ClbenchError(f"--set {part.cls.name}.{key}: {part.cls.name!r} has no hyperparameter {key!r}" +
                                   did_you_mean(key, params) + f" (it has: {', '.join(params) or 'none'})")
        values = {k: parse_value(hp, given[k], f"--set {part.cls.name}.{k}") if k in given else hp.default
                  for k, hp in params.items()}
        try:
            instances.append(part.cls(**values))
        except ValueError as exc:
            raise ClbenchError(f"strategy {part.cls.name!r}: {exc}") from None
        resolved.update({f"{part.cls.name}.{k}": list(v) if isinstance(v, tuple) else v for k, v in values.items()})
    return (instances[0] if len(instances) == 1 else Composite(instances)), resolved


def _check_option_owners(spec: str, names: list[str], options: dict[str, Any]) -> None:
    for key in options:
        owner = key.split(".", 1)[0]
        if "." not in key:
            raise ClbenchError(f"--set {key}: expected STRATEGY.PARAM=VALUE, e.g. ewc.lam=5000")
        if owner not in names:
            raise ClbenchError(f"--set {key}: strategy {owner!r} is not part of --strategy {spec}" +
                               did_you_mean(owner, names))


def options_for(spec: str, options: dict[str, Any]) -> dict[str, Any]:
    """The part of ``options`` that belongs to the strategies of ``spec`` (a comparison shares one --set)."""
    names = {find(ref.strip()).cls.name for ref in spec.split("+")}
    return {key: value for key, value in options.items() if key.split(".", 1)[0] in names}
