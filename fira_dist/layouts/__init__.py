"""Layouts: where gradients, optimizer state and updates live across ranks.

A layout takes the optimizer's tasks (parameters with gradients) for one step and runs the per-matrix math
of ``fira_dist.algorithm`` on the right rank, moving data with ``fira_dist.comm``. One module per layout:

- ``single.py``: one process, everything local (also the reference the others are tested against).
"""

from __future__ import annotations

from typing import Any


def make_layout(opt: Any, layout: Any, process_group: Any) -> Any:
    """Pick the layout: an object is used as is; "auto" looks at the parameters and the process group."""
    from fira_dist.layouts.single import SingleProcess

    if not isinstance(layout, str):
        return layout
    choices = {"single": SingleProcess}
    try:
        from fira_dist.layouts.replicated import Replicated

        choices["replicated"] = Replicated
    except ImportError:
        pass
    try:
        from fira_dist.layouts.row_sharded import RowSharded

        choices["row_sharded"] = RowSharded
    except ImportError:
        pass
    if layout == "auto":
        layout = _auto(opt, process_group, choices)
    if layout not in choices:
        raise ValueError(f"layout={layout!r} is not accepted; expected 'auto' or one of {sorted(choices)}")
    return choices[layout](opt, process_group)


def _auto(opt: Any, process_group: Any, choices: dict[str, Any]) -> str:
    import torch.distributed as dist

    params = [p for g in opt.param_groups for p in g["params"]]
    try:
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in params):
            return "row_sharded"
    except ImportError:
        pass
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        return "replicated"
    return "single"
