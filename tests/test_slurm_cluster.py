"""The two-node Slurm test cluster (tests/slurm_cluster.py) runs real multi-node jobs:
torch.distributed/gloo from srun env, MPI via `srun --mpi=pmi2`, and torchrun c10d rendezvous."""

import re
import textwrap

import pytest

try:
    from slurm_cluster import slurm_cluster_or_skip
except ImportError:  # tests/ made a package
    from tests.slurm_cluster import slurm_cluster_or_skip

pytestmark = pytest.mark.slow

FREE_PORT = """$(python -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"""

ALLREDUCE_PY = """
import os, socket, sys
import torch
import torch.distributed as dist

# under torchrun RANK/WORLD_SIZE/MASTER_* come from torchrun, under plain srun from Slurm
rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
os.environ.setdefault("RANK", str(rank))
os.environ.setdefault("WORLD_SIZE", str(world))
dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
hosts = [None] * world
dist.all_gather_object(hosts, socket.gethostname())
print(f"rank {rank}/{world} on {socket.gethostname()}", flush=True)
if rank == 0:
    print(f"RESULT sum={t.item():g} world={world} hosts={','.join(hosts)}", flush=True)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # gloo's threads can abort interpreter finalization (see fira_dist.pretrain.distributed)
"""

MPI_PY = """
import socket
from mpi4py import MPI
comm = MPI.COMM_WORLD
total = comm.allreduce(comm.Get_rank() + 1, op=MPI.SUM)
hosts = comm.allgather(socket.gethostname())
print(f"rank {comm.Get_rank()}/{comm.Get_size()} on {socket.gethostname()}", flush=True)
if comm.Get_rank() == 0:
    print(f"RESULT sum={total} world={comm.Get_size()} hosts={','.join(hosts)}", flush=True)
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with slurm_cluster_or_skip(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def _write(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def _run(slurm, tmp_path, body, timeout=240):  # generous: the 2 cores may be busy with other work
    script = _write(tmp_path / "job.sbatch", "#!/bin/bash\n#SBATCH --nodes=2 --ntasks-per-node=1\n"
                    "#SBATCH --time=5\nset -euo pipefail\n" + textwrap.dedent(body))
    res = slurm.submit_and_wait(script, cwd=tmp_path, timeout=timeout)
    assert res.ok, res.describe()
    m = re.search(r"^RESULT sum=(\S+) world=(\d+) hosts=(\S+)$", res.output, re.M)
    assert m, res.describe()
    return float(m.group(1)), int(m.group(2)), m.group(3).split(","), res


def _check(result):
    total, world, hosts, res = result
    assert world == 2, res.describe()
    assert total == 3, res.describe()  # ranks contribute 1 and 2
    assert sorted(hosts) == ["n1", "n2"], res.describe()


def test_srun_gloo_allreduce_two_nodes(slurm, tmp_path):
    _write(tmp_path / "allreduce.py", ALLREDUCE_PY)
    _check(_run(slurm, tmp_path, f"""
        export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
        export MASTER_PORT={FREE_PORT}
        srun python allreduce.py
    """))


def test_srun_mpi_pmi2_two_nodes(slurm, tmp_path):
    _write(tmp_path / "mpi_check.py", MPI_PY)
    _check(_run(slurm, tmp_path, "srun --mpi=pmi2 python mpi_check.py\n"))


def test_torchrun_c10d_rendezvous_two_nodes(slurm, tmp_path):
    _write(tmp_path / "allreduce.py", ALLREDUCE_PY)
    _check(_run(slurm, tmp_path, f"""
        HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
        PORT={FREE_PORT}
        srun --nodes=2 --ntasks-per-node=1 python -m torch.distributed.run --nnodes=2 --nproc-per-node=1 \\
            --rdzv-backend=c10d --rdzv-endpoint=$HEAD:$PORT --rdzv-id=$SLURM_JOB_ID allreduce.py
    """))
