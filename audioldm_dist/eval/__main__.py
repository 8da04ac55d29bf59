import sys

from audioldm_dist.eval.cli import main

sys.exit(main())
