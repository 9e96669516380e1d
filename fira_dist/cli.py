"""``fira-dist``: one entry point, one subcommand per job. Each subcommand's module owns its arguments."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "pretrain": ("fira_dist.pretrain.main", "pretrain a LLaMA model (single, DDP, FSDP2 or DeepSpeed)"),
    "memory": ("fira_dist.memory.report", "per-rank memory estimate / measurement for a model, optimizer and strategy"),
    "demo": ("fira_dist.demo", "train a small LLaMA with Fira on the embedded default (no network, no GPU)"),
    "convert-state": ("fira_dist.reference_state", "convert a fira.FiraAdamW / galore-torch GaLoreAdamW checkpoint"),
    "reshard": ("fira_dist.ds_universal", "make a DeepSpeed checkpoint of a Fira run load at any world size and stage"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fira-dist <command> [options]\n\ncommands:")
        for name, (_, doc) in SUBCOMMANDS.items():
            print(f"  {name:<15} {doc}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in SUBCOMMANDS:
        print(f"fira-dist: unknown command {cmd!r}; expected one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[cmd][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
