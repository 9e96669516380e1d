"""Launch-environment discovery and process-group start-up for ``fira-dist pretrain``.

Every launcher describes the job in its own environment variables. :func:`discover` reads them in this
order (the first that applies wins) and returns a :class:`LaunchEnv`:

==============  ==========================================================  ==============================
launcher        rank / world size / local rank                             rendezvous (if not set)
==============  ==========================================================  ==============================
torchrun,       ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (``deepspeed``     ``MASTER_ADDR``/``MASTER_PORT``
deepspeed, env  passes ``--local_rank`` too; both are accepted)             (set by the launcher)
Slurm ``srun``  ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (else            first host of the step's node
                ``SLURM_NTASKS``), ``SLURM_LOCALID``                        list; port 15000 + job id % 20000
MPI             ``OMPI_COMM_WORLD_*`` (Open MPI), ``PMI_RANK``/``PMI_SIZE``  rank 0's address and a free port,
                (MPICH / Hydra), ``PMIX_RANK`` (PMIx)                      broadcast with mpi4py
none            rank 0 of 1                                                 -
==============  ==========================================================  ==============================

:func:`export` writes the result back as ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT`` so that ``torch.distributed.init_process_group("env://")`` and DeepSpeed
see one consistent description, whatever started the processes. :func:`init_process_group` then starts
the group (gloo on CPU, NCCL on CUDA) with a timeout: a collective that waits longer than
``--dist-timeout`` seconds (a dead or stuck rank) raises instead of hanging forever.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import socket
import subprocess
from typing import Mapping

from fira_dist.processes import destroy, exit_without_finalization  # noqa: F401  (the trainer's D.destroy ...)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "none"  # torchrun | deepspeed | env | slurm | mpi | none

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def describe(self) -> str:
        where = f" via {self.master_addr}:{self.master_port}" if self.distributed else ""
        return (f"rank {self.rank} of {self.world_size} (local rank {self.local_rank} of {self.local_world_size}, "
                f"launcher {self.launcher}){where}")


def _int(env: Mapping[str, str], *keys: str, default: int | None = None) -> int | None:
    for key in keys:
        value = env.get(key)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {key}={value!r} is not an integer") from None
    return default


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list ("n[1-3,7],m2" -> "n1"); uses ``scontrol`` when it is there."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.split(r",(?![^\[]*\])", nodelist.strip())[0]  # first entry, commas inside [] kept
    m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", head)
    if not m:
        return head
    prefix, ranges, suffix = m.groups()
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def _local_world(env: Mapping[str, str], world: int) -> int:
    n = _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
    if n is None:
        tpn = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        m = re.match(r"^(\d+)", tpn)
        n = int(m.group(1)) if m else world
    return max(1, min(n, world))


def discover(env: Mapping[str, str] | None = None, mpi_rendezvous: bool = True) -> LaunchEnv:
    """Read the launch environment (see the module docstring). Nothing is started.

    ``mpi_rendezvous``: under MPI without ``MASTER_ADDR``, broadcast rank 0's address and a free port with
    mpi4py (a collective over MPI_COMM_WORLD: every rank must call this). Raises ``ValueError`` naming the
    variable for inconsistent values.
    """
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR"), _int(env, "MASTER_PORT")
    if env.get("RANK") not in (None, "") and env.get("WORLD_SIZE") not in (None, ""):
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK", default=0)
        if "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        elif "CROSS_RANK" in env and "LOCAL_SIZE" in env:
            launcher = "deepspeed"
        else:
            launcher = "env"
    elif env.get("SLURM_PROCID") not in (None, "") and \
            _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1) > 1:
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID", default=0)
        launcher = "slurm"
        if addr is None:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            addr = first_host(nodes) if nodes else "127.0.0.1"
        if port is None:
            port = 15000 + _int(env, "SLURM_JOB_ID", default=0) % 20000
    elif any(k in env for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")):
        rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
        world = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK", default=0)
        launcher = "mpi"
        if world is None or (world > 1 and addr is None and mpi_rendezvous):
            addr, port, world = _mpi_rendezvous(addr, port)
    else:
        rank, world, local, launcher = 0, 1, 0, "none"
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"launch environment ({launcher}) gives rank {rank} and world size {world}: "
                         "need 0 <= rank < world size")
    if local is not None and local < 0:
        raise ValueError(f"launch environment ({launcher}) gives local rank {local} (LOCAL_RANK, SLURM_LOCALID or the "
                         "MPI local rank): not accepted; expected an integer >= 0")
    if world > 1 and port is not None and not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT={port} is not accepted: expected a port number 1-65535")
    local_world = _local_world(env, world) if world > 1 else 1
    if world > 1 and (addr is None or port is None):
        raise ValueError(f"launch environment ({launcher}) gives world size {world} but no MASTER_ADDR/MASTER_PORT "
                         "for the rendezvous: set them, or start the job with torchrun, srun or mpirun")
    return LaunchEnv(rank=rank, world_size=world, local_rank=local or 0, local_world_size=local_world,
                     master_addr=addr, master_port=port, launcher=launcher)


def _mpi_rendezvous(addr: str | None, port: int | None) -> tuple[str, int, int]:
    """Rank 0's address and a free port, broadcast over MPI_COMM_WORLD (mpi4py)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ValueError("started under MPI (OMPI_/PMI_ variables are set) without MASTER_ADDR, and mpi4py is not "
                         f"importable ({e}): install mpi4py or set MASTER_ADDR/MASTER_PORT") from None
    comm = MPI.COMM_WORLD
    mine = None
    if comm.Get_rank() == 0:
        host = addr or _my_address()
        if port is None:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
        mine = (host, port)
    host, port = comm.bcast(mine, root=0)
    return host, int(port), comm.Get_size()


def _my_address() -> str:
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


def export(le: LaunchEnv) -> None:
    """Write the discovered values into ``os.environ`` (what ``env://`` and DeepSpeed read)."""
    os.environ["RANK"] = str(le.rank)
    os.environ["WORLD_SIZE"] = str(le.world_size)
    os.environ["LOCAL_RANK"] = str(le.local_rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(le.local_world_size)
    if le.master_addr is not None:
        os.environ["MASTER_ADDR"] = le.master_addr
    if le.master_port is not None:
        os.environ["MASTER_PORT"] = str(le.master_port)


def pick_device(requested: str, le: LaunchEnv):
    """``torch.device`` for this rank: "auto" is CUDA (``cuda:LOCAL_RANK``) when available, else CPU."""
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device=cuda is not accepted here: torch.cuda.is_available() is False; "
                             "expected auto or cpu")
        dev = torch.device("cuda", le.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def init_process_group(le: LaunchEnv, device, timeout_s: float, deepspeed: bool = False) -> None:
    """Start the default process group (gloo on CPU, NCCL on CUDA) with ``timeout_s``; no-op for one process.

    Under ``deepspeed=True`` DeepSpeed's ``init_distributed`` starts it (so that ``deepspeed.comm`` knows it).
    Collective: every rank calls it.
    """
    import torch.distributed as dist

    if not le.distributed and (le.master_addr is None or le.master_port is None):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # DeepSpeed wants a rendezvous even for one
            s.bind(("127.0.0.1", 0))
            le = dataclasses.replace(le, master_addr=le.master_addr or "127.0.0.1", master_port=s.getsockname()[1])
    export(le)
    timeout = datetime.timedelta(seconds=float(timeout_s))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if deepspeed:
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
                            rank=le.rank, world_size=le.world_size)
        return
    if not le.distributed or dist.is_initialized():
        return
    log.info("starting process group: %s, backend %s, timeout %.0f s", le.describe(), backend, timeout_s)
    dist.init_process_group(backend=backend, timeout=timeout, rank=le.rank, world_size=le.world_size,
                            device_id=device if device.type == "cuda" else None)


def is_dist() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    import torch.distributed as dist

    if is_dist():
        dist.barrier()


def all_gather_object(obj):
    """List of every rank's ``obj`` (``[obj]`` for one process). Collective."""
    import torch.distributed as dist

    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank. Collective."""
    import torch.distributed as dist

    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
