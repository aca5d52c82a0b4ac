"""The `qtoy` command line (installed as `qtoy_cli`): thin commands over qtoy_core."""
