"""Per-rank memory of a training configuration: estimated (any size), measured (real steps), reported.

- ``memory.config``     ``MemoryConfig``: model, optimizer, strategy, world size, precision, batch, budgets.
- ``memory.model``      the model's shapes and param groups (meta device) and its saved activations.
- ``memory.optimizer``  the optimizer's state, buffers and traffic, from the layouts' own plans.
- ``memory.estimate``   one rank's bytes of everything, and the peak.
- ``memory.measure``    real steps on CPU or GPU, per rank, in the estimate's categories.
- ``memory.report``     tables, plots and the CLI ``fira-dist memory``.

Imports go one way (config, model -> optimizer -> estimate -> measure -> report): no cycle, and nothing here
imports the trainer (``fira_dist.pretrain``).
"""

from fira_dist.memory.config import MemoryConfig
from fira_dist.memory.estimate import estimate, estimate_all_ranks
from fira_dist.memory.model import ModelInfo, activation_bytes, model_info, model_info_from_module

__all__ = ["MemoryConfig", "ModelInfo", "activation_bytes", "estimate", "estimate_all_ranks", "model_info",
           "model_info_from_module"]
