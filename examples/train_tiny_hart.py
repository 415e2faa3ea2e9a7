"""Train a tiny HART end to end, on CPU or one GPU: the demo model shipped in ``assets/demo``.

    bash examples/reproduce_demo.sh                                 # the shipped model, run by run
    python examples/train_tiny_hart.py --out /tmp/smoke --smoke     # a few steps of a tiny config
    python examples/train_tiny_hart.py --help                       # every flag

The command line of :mod:`hartkit.train`, which documents the method, its deviations from upstream
and the checkpoint it writes.
"""

from __future__ import annotations

from hartkit.train.config import parse_args
from hartkit.train.run import train

if __name__ == "__main__":
    train(parse_args())
