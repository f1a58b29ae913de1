"""``python -m hybridseq ...``: the same as the ``hybridseq`` command."""
from .cli import main

raise SystemExit(main())
