"""`python -m experiments.pretrain OUT [flags]`: train a SHAPES base checkpoint (flags: --help)."""

import sys

from experiments.pretrain.recipe import main

sys.exit(main())
