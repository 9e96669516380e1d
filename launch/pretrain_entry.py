"""``python launch/pretrain_entry.py ARGS`` == ``python -m fira_dist.pretrain ARGS``, as a file.

The ``deepspeed`` launcher needs a script path: its ``--module`` flag is dropped by the slurm backend
(``srun ... python -u <script>``), so launch/deepspeed_multinode.sh hands every backend this file.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("fira_dist.pretrain", run_name="__main__", alter_sys=True)
