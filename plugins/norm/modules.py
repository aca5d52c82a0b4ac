from torch import nn


class NoNorm(nn.Identity):
    def __init__(self, model, config):
        super().__init__()


class RMSNorm(nn.RMSNorm):
    def __init__(self, model, config):
        super().__init__(model.d_model, eps=config.eps)
