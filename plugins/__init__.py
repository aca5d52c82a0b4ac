"""qtoy's built-in components (installed as `qtoy_plugins`).

Each kind's package `__init__` holds its config classes and its `register_<kind>s` hook; the modules
next to it hold the implementations, referenced lazily so that listing components never imports
torch. They are registered through the project's own `qtoy` entry points, exactly like a
third-party plugin package.
"""
