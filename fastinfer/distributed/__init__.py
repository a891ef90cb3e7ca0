"""Tensor parallelism over ``torch.distributed`` (issue 24): how a model is split across ranks
(``layout``); process groups and collectives come next."""
