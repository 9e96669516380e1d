"""fira_dist: the Fira optimizer (arXiv 2410.01623) for single-process, DDP, FSDP2 and DeepSpeed ZeRO training."""

from fira_dist.optimizer import Fira, param_groups

__all__ = ["Fira", "param_groups"]
__version__ = "0.1.0"
