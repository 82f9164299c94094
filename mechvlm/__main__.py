"""``python -m mechvlm ...`` (and ``torchrun --nproc-per-node N -m mechvlm report ...``):
the ``mechvlm`` command line."""

import sys

from mechvlm.cli import main

sys.exit(main())
