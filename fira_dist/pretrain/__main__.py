"""``python -m fira_dist.pretrain``: the same as ``fira-dist pretrain`` (see fira_dist.pretrain.main)."""

import sys

from fira_dist.pretrain.main import main

if __name__ == "__main__":
    sys.exit(main())
