"""The table of registered components and the plugin manager that fills it.

Plugins load once, lazily, on the first lookup. Each entry point loads inside its own
try/except, and each plugin's hooks are called one plugin at a time, so one broken plugin costs
a warning, never the CLI. Nothing here imports torch.

qtoy's own components are imported directly (`BUILTIN_PLUGINS`), not found through the entry
points its metadata declares, as simonw/llm loads its default plugins: a source checkout on
sys.path without installed metadata, or metadata left stale by an older install, still has every
built-in, and each is registered once whatever the metadata says.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import os
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from . import hookspecs
from .errors import DuplicateComponentError, PluginError, PluginWarning, UnknownComponentError

BUILTIN_DISTRIBUTION = "qtoy"
# qtoy's built-in plugins: entry-point name -> module. pyproject.toml's [project.entry-points.qtoy]
# declares the same table (tests/test_registry.py keeps the two equal).
BUILTIN_PLUGINS = {
    "attention": "qtoy_plugins.attention",
    "mlp": "qtoy_plugins.mlp",
    "positional": "qtoy_plugins.positional",
    "norm": "qtoy_plugins.norm",
    "optimizer": "qtoy_plugins.optim",
    "dataset": "qtoy_plugins.data",
    "callback": "qtoy_plugins.callbacks",
}


@dataclass(frozen=True)
class Provider:
    """Who registered a component: the distribution (pip package) and its version."""

    distribution: str
    version: str
    plugin: str  # the entry-point (or in-process plugin) name

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}".strip()


@dataclass
class Component:
    kind: str
    name: str
    config_class: type
    implementation: Any  # the object, or a lazy "module:attr" reference
    description: str
    provider: Provider

    def load(self) -> Any:
        """The implementation, importing it first if it was registered as a lazy reference."""
        if isinstance(self.implementation, str):
            module_name, _, attr = self.implementation.partition(":")
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self.implementation = obj
        return self.implementation


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)


def _literal_name(config_class: type) -> str:
    """The single value of the config class's `name: Literal[...]` field."""
    fields = getattr(config_class, "model_fields", None)
    if fields is None:
        raise TypeError(f"{config_class!r} is not a pydantic model class")
    if "name" not in fields:
        raise TypeError(f"{config_class.__name__} has no `name: Literal[...]` field")
    args = typing.get_args(fields["name"].annotation)
    if typing.get_origin(fields["name"].annotation) is not typing.Literal or len(args) != 1:
        raise TypeError(f"{config_class.__name__}.name must be typed Literal['<one name>']")
    if config_class.model_config.get("extra") != "forbid":
        raise TypeError(f"{config_class.__name__} must set model_config extra='forbid'")
    return args[0]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class Registry:
    """Registered components by kind and name, filled from the `qtoy` entry points."""

    def __init__(self, *, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._load_entry_points = load_entry_points
        self._plugins: dict[str, PluginInfo] = {}
        self._entry_points_loaded = False
        self._table: dict[str, dict[str, Component]] | None = None
        self._conflicts: dict[tuple[str, str], list[Provider]] = {}

    # -- plugin loading -------------------------------------------------------------------
    def _fail(self, plugin: str, distribution: str, cause: str) -> None:
        message = (
            f"Plugin {plugin!r} from package {distribution!r} was skipped: {cause}. "
            f"Everything else keeps working; fix or uninstall that package "
            f"(`pip uninstall {distribution}`), or exclude it with QTOY_LOAD_PLUGINS."
        )
        if _env_flag("QTOY_STRICT_PLUGINS"):
            raise PluginError(message)
        warnings.warn(message, PluginWarning, stacklevel=3)

    def _ensure_entry_points(self) -> None:
        if self._entry_points_loaded or not self._load_entry_points:
            return
        self._entry_points_loaded = True
        allowed_env = os.environ.get("QTOY_LOAD_PLUGINS")
        allowed = None if allowed_env is None else {p.strip() for p in allowed_env.split(",") if p.strip()}
        # qtoy's own first: a third-party clash is then reported against the built-in
        self._load_builtins()
        entry_points = importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP)
        for ep in entry_points:
            dist = ep.dist.name if ep.dist is not None else "unknown"
            version = ep.dist.version if ep.dist is not None else ""
            if dist == BUILTIN_DISTRIBUTION and ep.name in BUILTIN_PLUGINS:
                continue  # loaded above from the module itself (the metadata may be missing or stale)
            if dist != BUILTIN_DISTRIBUTION and allowed is not None and dist not in allowed:
                continue
            if ep.name in self._plugins:
                taken_by = self._plugins[ep.name].distribution
                if taken_by != dist:  # the same name from another package would be lost silently
                    self._fail(ep.name, dist, f"its entry-point name {ep.name!r} is already used by the package "
                                              f"{taken_by!r}; entry-point names in the 'qtoy' group must be unique, "
                                              f"so rename it in {dist}'s pyproject.toml (e.g. to its import name)")
                continue
            try:
                module = ep.load()
            except Exception as exc:  # any import failure of a plugin must not take qtoy down
                self._fail(ep.name, dist, f"importing {ep.value} raised {type(exc).__name__}: {exc}")
                continue
            self._add(module, ep.name, dist, version)

    def _load_builtins(self) -> None:
        try:
            version = importlib.metadata.version(BUILTIN_DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:  # a source checkout that was never installed
            version = "0+unknown"
        for name, module_name in BUILTIN_PLUGINS.items():
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # a damaged install: the other built-ins and plugins still load
                self._fail(name, BUILTIN_DISTRIBUTION, f"importing {module_name} raised {type(exc).__name__}: {exc}")
                continue
            if not self.pm.is_registered(module):
                self._add(module, name, BUILTIN_DISTRIBUTION, version)

    def _add(self, plugin: object, name: str, distribution: str, version: str) -> bool:
        try:
            self.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            self._fail(name, distribution, f"its hooks do not match qtoy's hook specifications ({exc})")
            return False
        unknown = [hc.name for hc in self.pm.get_hookcallers(plugin) or [] if not hc.has_spec()]
        if unknown:
            self.pm.unregister(plugin)
            self._fail(
                name, distribution,
                f"it implements unknown hook(s) {', '.join(unknown)}; the hooks are "
                f"{', '.join(hookspecs.KIND_HOOKS.values())}",
            )
            return False
        hooks = [hc.name for hc in self.pm.get_hookcallers(plugin) or []]
        self._plugins[name] = PluginInfo(name, distribution, version, sorted(hooks))
        self._table = None
        return True

    def add_plugin(self, plugin: object, name: str | None = None, *, distribution: str = "<in-process>",
                   version: str = "") -> str:
        """Register an in-process plugin (an object or module with hookimpls), e.g. in a test."""
        self._ensure_entry_points()
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if not self._add(plugin, name, distribution, version):
            raise PluginError(f"In-process plugin {name!r} could not be registered (see the warning).")
        return name

    def remove_plugin(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._plugins.pop(name, None)
        self._table = None

    def plugins(self) -> list[PluginInfo]:
        self._ensure_entry_points()
        return sorted(self._plugins.values(), key=lambda p: (p.distribution != BUILTIN_DISTRIBUTION, p.name))

    # -- the component table -----------------------------------------------------------------
    def _build_table(self) -> dict[str, dict[str, Component]]:
        self._ensure_entry_points()
        table: dict[str, dict[str, Component]] = {kind: {} for kind in hookspecs.KIND_HOOKS}
        conflicts: dict[tuple[str, str], list[Provider]] = {}
        for kind, hook_name in hookspecs.KIND_HOOKS.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                info = self._plugins[impl.plugin_name]
                provider = Provider(info.distribution, info.version, info.name)
                staged: list[Component] = []

                def register(config_class: type, implementation: Any, description: str = "",
                             *, _staged=staged, _provider=provider, _kind=kind) -> None:
                    name = _literal_name(config_class)
                    if not description:
                        # the docstring's first paragraph, on one line
                        doc = (config_class.__doc__ or "").strip().split("\n\n")[0]
                        description = " ".join(line.strip() for line in doc.splitlines())
                    _staged.append(Component(_kind, name, config_class, implementation, description, _provider))

                try:
                    impl.function(**{arg: register for arg in impl.argnames})
                except Exception as exc:  # one plugin's failure costs only its own components
                    self._fail(info.name, info.distribution, f"its {hook_name} hook raised {type(exc).__name__}: {exc}")
                    continue
                for comp in staged:
                    existing = table[kind].get(comp.name)
                    if existing is not None and existing.provider != comp.provider:
                        providers = conflicts.setdefault((kind, comp.name), [existing.provider])
                        providers.append(comp.provider)
                        continue
                    table[kind][comp.name] = comp
        for (kind, name), providers in conflicts.items():
            err = DuplicateComponentError(kind, name, [str(p) for p in providers])
            if _env_flag("QTOY_STRICT_PLUGINS"):
                raise err
            warnings.warn(str(err), PluginWarning, stacklevel=3)
        self._conflicts = conflicts
        return table

    @property
    def table(self) -> dict[str, dict[str, Component]]:
        if self._table is None:
            self._table = self._build_table()
        return self._table

    def kinds(self) -> list[str]:
        return list(hookspecs.KIND_HOOKS)

    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        return sorted(self.table[kind])

    def get(self, kind: str, name: str) -> Component:
        self._check_kind(kind)
        table = self.table[kind]
        if (kind, name) in self._conflicts:
            raise DuplicateComponentError(kind, name, [str(p) for p in self._conflicts[(kind, name)]])
        if name not in table:
            raise UnknownComponentError(kind, name, sorted(table))
        return table[name]

    def components(self, kind: str | None = None, pattern: str | None = None) -> list[Component]:
        kinds = [kind] if kind else self.kinds()
        out = []
        for k in kinds:
            self._check_kind(k)
            for name in sorted(self.table[k]):
                if pattern is None or fnmatch.fnmatchcase(name, pattern):
                    out.append(self.table[k][name])
        return out

    def _check_kind(self, kind: str) -> None:
        if kind not in hookspecs.KIND_HOOKS:
            raise UnknownComponentError("component kind", kind, list(hookspecs.KIND_HOOKS))


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loading plugins on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    return _REGISTRY


def reset_registry() -> None:
    """Forget loaded plugins (e.g. after changing QTOY_LOAD_PLUGINS); the next lookup reloads."""
    global _REGISTRY
    _REGISTRY = None


Factory = Callable[..., Any]
