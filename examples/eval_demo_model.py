"""Evaluate the demo model: caption accuracy on held-out prompts, and the tokenizer's PSNRs.

    python examples/eval_demo_model.py                       # assets/demo, 100 held-out prompts
    python examples/eval_demo_model.py --grid grid.png --json eval.json --update-readme
    python examples/eval_demo_model.py --help                # every flag

The command line of :mod:`hartkit.train.demo_eval`, which says what each number means.
"""

from __future__ import annotations

import sys

from hartkit.train.demo_eval import main

if __name__ == "__main__":
    sys.exit(main())
