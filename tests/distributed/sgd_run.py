"""`benchmarks.run` with plain SGD in place of AdamW, for comparing runs' weights: an update
is then the learning rate times the gradient, so two runs' LoRA weights agree as closely as
their gradients do. AdamW's first update is about lr x sign(gradient) in every entry, which
turns float noise in an entry whose gradient is near zero into a whole step."""

import sys

import torch

from benchmarks.run import main


def _sgd(params, lr, **_):
    return torch.optim.SGD(params, lr=lr)


if __name__ == "__main__":
    torch.optim.AdamW = _sgd
    sys.exit(main(sys.argv[1:]))
