"""The script the ``deepspeed`` launcher (or ``torchrun``) runs on every rank.

    deepspeed --num_gpus 8 launch/train.py layouts/blackmamba.yaml --deepspeed launch/zero2.json \
        --out runs/bm train.steps=20000
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train.py LAYOUT --deepspeed launch/zero1.json

See ``hybridseq/train/launcher.py`` for the options and ``launch/README.md`` for multi-node runs.
"""
import os
import sys

try:
    import hybridseq  # noqa: F401  (installed, or PYTHONPATH set)
except ImportError:  # run from a source checkout: the repository root is this folder's parent
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hybridseq.train.launcher import main

if __name__ == "__main__":
    sys.exit(main())
