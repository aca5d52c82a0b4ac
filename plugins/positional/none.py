from qtoy_core.interfaces import Positional


class NoPositional(Positional):
    """Adds nothing and rotates nothing: only the causal mask tells positions apart."""

    def __init__(self, model, config):
        super().__init__()
