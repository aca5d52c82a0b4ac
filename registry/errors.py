"""Errors the registry raises. Each message names the problem and the fix in one paragraph."""


class QtoyError(Exception):
    """Base of every error qtoy raises on purpose; the CLI prints these without a traceback."""


class UnknownComponentError(QtoyError, LookupError):
    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, available
        listed = ", ".join(available) if available else "(none registered)"
        super().__init__(
            f"Unknown {kind} {name!r}. Available: {listed}. If it comes from a plugin package, "
            f"install it (see `qtoy plugins` for what is loaded, and `qtoy list {kind}`)."
        )


class DuplicateComponentError(QtoyError):
    def __init__(self, kind: str, name: str, providers: list[str]):
        self.kind, self.name, self.providers = kind, name, providers
        super().__init__(
            f"The {kind} {name!r} is registered by more than one plugin: {' and '.join(providers)}. "
            f"qtoy cannot tell which one you mean; uninstall one of them, or limit the plugins "
            f"that load with QTOY_LOAD_PLUGINS=<package,...>."
        )


class PluginError(QtoyError):
    """A plugin failed to load or to register (raised instead of warned with QTOY_STRICT_PLUGINS=1)."""


class PluginWarning(UserWarning):
    """A plugin was skipped; everything else keeps working."""
