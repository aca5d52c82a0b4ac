from qtoy_core import Positional


class NoPositional(Positional):
    """Adds nothing and rotates nothing: only the causal mask tells positions apart."""

    supports_doc_mask = True  # nothing depends on the positions

    def __init__(self, model, config):
        super().__init__()

    def tensor_network(self, tn, x, *, op):
        """Nothing to add or rotate (qtoy_core.analysis.tensor_network)."""
        return x
