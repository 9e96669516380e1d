"""Hugging Face Trainer with ``--deepspeed ds_config.json`` whose optimizer block is {"type": "fira", ...}.

    deepspeed --num_gpus 2 tests/ds_trainer_worker.py --deepspeed cfg.json --output_dir OUT --max_steps 10 \
        --per_device_train_batch_size 2 --report_to none --save_strategy no --logging_steps 1

The script only calls ``fira_dist.deepspeed.register()`` before training; everything else is a stock Trainer.
Rank 0 writes OUT/result.json: the optimizer and layout DeepSpeed ended up with, the logged losses, and every
rank's Fira state bytes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ds_common import make_batches, tiny_llama  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.x = make_batches(1, n)[0]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def main() -> int:
    from transformers import HfArgumentParser, Trainer, TrainingArguments

    import fira_dist.deepspeed as fds
    from fira_dist import Fira

    fds.register()
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    trainer = Trainer(model=tiny_llama(0), args=args, train_dataset=Tokens(64))
    trainer.train()
    engine = trainer.model_wrapped
    opt = engine.basic_optimizer
    layout = opt.layout
    mine = {"state_bytes": layout.state_bytes()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result = {"optimizer": type(opt).__name__, "is_fira": isinstance(opt, Fira), "wrapper": type(engine.optimizer).__name__,
                  "mode": layout.mode, "zero_stage": layout.stage, "world_size": dist.get_world_size(),
                  "engine_step": layout.engine_step, "global_step": trainer.state.global_step, "losses": losses,
                  "state": gathered, "rank": opt.param_groups[-1].get("rank"), "lr": opt.param_groups[-1]["lr"],
                  "owners": layout.owners()}
        Path(args.output_dir, "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    code = main()
    # gloo sometimes aborts in its teardown at interpreter exit ("terminate called without an active
    # exception", ~1 run in 10 here) after the work is done: leave the group cleanly and exit at once.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
