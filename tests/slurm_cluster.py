"""A real two-node Slurm 22.05 cluster on one Linux machine, for tests.

Each node (``n1``, ``n2``) is a network + UTS namespace with its own hostname and 10.x address (joined
by a veth pair); ``slurmctld`` runs on n1, one ``slurmd`` per node. All namespaces share the filesystem,
so jobs see the repo, the venv and the temp dir. A private ``munged`` (own key and socket in the temp
dir) authenticates them. See /work/shared/design/TESTING.md for the recipe this follows.

Needs root, ``ip``/``nsenter``/``unshare`` and the Debian packages ``slurmd slurmctld slurm-client
munge`` (installed with apt-get on first use if missing). When that cannot work (not root, no apt,
not Linux) :class:`SlurmUnavailable` is raised; :func:`slurm_cluster_or_skip` turns it into
``pytest.skip(reason)``.

Usage from a test::

    import pytest
    try:
        from slurm_cluster import slurm_cluster_or_skip        # tests/ on sys.path (no __init__.py)
    except ImportError:
        from tests.slurm_cluster import slurm_cluster_or_skip

    @pytest.fixture(scope="module")        # startup costs a few seconds: share one cluster per module
    def slurm(tmp_path_factory):
        with slurm_cluster_or_skip(tmp_path_factory.mktemp("slurm")) as cluster:
            yield cluster

    @pytest.mark.slow
    def test_job(slurm, tmp_path):
        job = slurm.submit("launch/pretrain.sbatch", env={"FOO": "1"}, args=["--steps", "2"],
                           sbatch_args=["--nodes=2", "--ntasks-per-node=1"])
        res = slurm.wait(job, timeout=120)      # polls `scontrol show job`
        assert res.ok, res.describe()           # state COMPLETED and exit code 0
        print(res.output)                       # the job's stdout+stderr file

Or directly: ``with SlurmCluster(tmpdir) as cluster: ...`` (raises SlurmUnavailable instead of skipping).

What jobs get:
- The environment of the test process (``sbatch --export=ALL``), minus inherited ``SLURM_*``/``SBATCH_*``
  /``SRUN_*`` variables, plus: ``SLURM_CONF``; this interpreter's bin dir (the venv) first on ``PATH``
  (so ``python`` / ``torchrun`` in a script are the venv's); the repo root first on ``PYTHONPATH`` (the
  package is not pip-installed); ``OMP_NUM_THREADS=1`` unless set; then ``env=`` overrides on top.
- ``--chdir`` = ``cwd`` argument (default: repo root); output in ``<tmpdir>/jobs/slurm-<jobid>.out``
  (stdout+stderr) unless ``sbatch_args`` contains ``--output``/``-o``.
- Node names ``n1``/``n2`` resolve on both nodes (tagged lines in /etc/hosts), so
  ``HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)`` works as MASTER_ADDR or as the
  ``--rdzv-endpoint`` host of ``torchrun --rdzv-backend=c10d``; ``hostname`` differs per node. Ports
  are free in the fresh namespaces (any fixed port like 29500 works), and ``srun --mpi=pmi2`` works with
  mpi4py + pip ``mpich``.
- Slurm clients (``sbatch``, ``scontrol``, ``squeue``...) must run inside n1's namespace with
  ``SLURM_CONF``: use ``cluster.run([...])`` / ``cluster.scontrol(...)``.

Timing measured on a 2-core VM: ~0.5-1.5 s from nothing to two idle nodes (plus apt-get the first time),
a 2-node gloo job of a small torch script ~5 s, the same under `srun torchrun` c10d ~8-11 s, mpi4py <1 s.
Harmless noise in job output: c10d's "The hostname of the client socket cannot be retrieved. err=-3"
(glibc cannot reverse-resolve IPv4-mapped IPv6 peers from /etc/hosts). Teardown (``__exit__``, also after exceptions) stops the
daemons by PID, kills what is left in the namespaces, deletes them and removes the /etc/hosts lines.
Clusters are serialised by a lock file (one cluster at a time per machine: node names are shared via
/etc/hosts), and whatever a crashed earlier run left (namespaces, hosts lines, daemons carrying the tag)
is removed before starting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
TAG = "fdslurm"  # prefix of namespace names, run dirs and /etc/hosts markers
HOSTS_MARK = f"# {TAG}-test-cluster"
HOSTS_FILE = Path("/etc/hosts")
LOCK_FILE = Path("/tmp") / f"{TAG}-cluster.lock"
REPO_ROOT = Path(__file__).resolve().parent.parent
APT_PACKAGES = ("slurmd", "slurmctld", "slurm-client", "munge")
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
}
_DAEMON_NAMES = {"munged", "slurmd", "slurmctld", "slurmstepd"}


class SlurmUnavailable(RuntimeError):
    """The cluster cannot work on this machine (the reason is the message); tests should skip."""


class SlurmJobTimeout(TimeoutError):
    """A job did not reach a terminal state in time (it has been cancelled)."""


@dataclasses.dataclass
class JobResult:
    job_id: int
    state: str            # e.g. COMPLETED, FAILED, CANCELLED, TIMEOUT
    exit_code: int        # the batch script's exit code
    signal: int           # the signal that ended it, 0 if none
    output_path: Path
    info: dict            # all `scontrol show job -o` fields

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == 0 and self.signal == 0

    @property
    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self, tail: int = 4000) -> str:
        return (f"job {self.job_id}: state={self.state} exit={self.exit_code}:{self.signal}\n"
                f"--- {self.output_path} (tail) ---\n{self.output[-tail:]}")


# ----------------------------------------------------------------------------------------------
# helpers

def _sh(cmd: Sequence[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n"
                           f"stdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-2000:]}")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pids(pids: Iterable[int], grace: float = 5.0) -> None:
    """SIGTERM the given pids, wait up to `grace` seconds, then SIGKILL the survivors (zombies count as dead)."""
    pids = [p for p in set(pids) if p > 1 and p != os.getpid()]
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _pid_alive(p) and not _is_zombie(p)]
        if pids:
            time.sleep(0.05)
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _set_pdeathsig() -> None:  # runs in the child before exec: die with the test process
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _netns_list() -> list[str]:
    p = _sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    p = _sh(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def _remove_hosts_lines(match: str) -> None:
    """Remove lines containing `match` from /etc/hosts, rewriting it in place (it may be a bind mount)."""
    with open(HOSTS_FILE, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        lines = f.read().splitlines(keepends=True)
        kept = [line for line in lines if match not in line]
        if kept != lines:
            f.seek(0)
            f.write("".join(kept))
            f.truncate()


def _add_hosts_lines(lines: Sequence[str]) -> None:
    with open(HOSTS_FILE, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        text = f.read()
        if text and not text.endswith("\n"):
            text += "\n"
        f.seek(0)
        f.write(text + "".join(line + "\n" for line in lines))
        f.truncate()


def _tagged_daemon_pids() -> list[int]:
    """PIDs of munged/slurmd/slurmctld processes whose command line names a run dir of ours."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0]:
            continue
        name = os.path.basename(argv[0].decode(errors="replace"))
        if name in _DAEMON_NAMES and any(f"/{TAG}-run-".encode() in a for a in argv):
            pids.append(int(d.name))
    return pids


def cleanup_stale() -> None:
    """Remove everything a previous (crashed) run left behind: tagged daemons, namespaces, hosts lines.

    Only call while holding the cluster lock (then no live cluster owns these things)."""
    stale_ns = [ns for ns in _netns_list() if ns.startswith(TAG + "-")]
    pids = _tagged_daemon_pids()
    for ns in stale_ns:
        pids += _netns_pids(ns)
    if pids:
        _kill_pids(pids, grace=2.0)
    for ns in stale_ns:
        _sh(["ip", "netns", "del", ns], check=False)
    _remove_hosts_lines(HOSTS_MARK)


def check_prerequisites(install: bool = True) -> None:
    """Raise SlurmUnavailable if the cluster cannot work here; apt-get install missing Slurm/munge."""
    if not sys.platform.startswith("linux"):
        raise SlurmUnavailable("needs Linux (network namespaces)")
    if os.geteuid() != 0:
        raise SlurmUnavailable("needs root (network namespaces, /etc/hosts, slurmd)")
    for tool in ("ip", "nsenter", "unshare", "hostname"):
        if shutil.which(tool) is None:
            raise SlurmUnavailable(f"missing tool {tool!r} (iproute2 / util-linux)")
    needed = {"slurmd": "/usr/sbin/slurmd", "slurmctld": "/usr/sbin/slurmctld", "sbatch": None,
              "srun": None, "scontrol": None, "munged": "/usr/sbin/munged"}
    missing = [b for b, p in needed.items() if shutil.which(b) is None and not (p and os.path.exists(p))]
    if missing:
        if not install:
            raise SlurmUnavailable(f"missing {missing} and install=False")
        if shutil.which("apt-get") is None:
            raise SlurmUnavailable(f"missing {missing} and no apt-get to install {APT_PACKAGES}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES]
        p = _sh(cmd, check=False, timeout=900, env=env)
        if p.returncode != 0:  # maybe the package lists are missing: update once and retry
            _sh(["apt-get", "update"], check=False, timeout=600, env=env)
            p = _sh(cmd, check=False, timeout=900, env=env)
        if p.returncode != 0:
            raise SlurmUnavailable(f"apt-get install {' '.join(APT_PACKAGES)} failed: {p.stderr[-1500:]}")
        missing = [b for b, p in needed.items() if shutil.which(b) is None and not (p and os.path.exists(p))]
        if missing:
            raise SlurmUnavailable(f"still missing {missing} after apt-get install")
    # network namespaces must be usable (e.g. not in an unprivileged container)
    probe = f"{TAG}-probe-{os.getpid()}"
    p = _sh(["ip", "netns", "add", probe], check=False)
    if p.returncode != 0:
        raise SlurmUnavailable(f"cannot create network namespaces: {p.stderr.strip()}")
    _sh(["ip", "netns", "del", probe], check=False)


def _which(name: str) -> str:
    return shutil.which(name) or os.path.join("/usr/sbin", name)


# ----------------------------------------------------------------------------------------------

class SlurmCluster:
    """Context manager: a two-node Slurm cluster (nodes ``n1``, ``n2``) in network namespaces."""

    def __init__(self, tmpdir, *, nodes: Sequence[str] = ("n1", "n2"), cpus: int | None = None,
                 real_memory: int = 2000, install: bool = True, startup_timeout: float = 90.0,
                 lock_timeout: float = 900.0):
        self.tmpdir = Path(tmpdir).resolve()
        self.nodes = list(nodes)
        self.cpus = cpus or (os.cpu_count() or 1)  # slurmd compares it with the real hardware
        self.real_memory = real_memory
        self.install = install
        self.startup_timeout = startup_timeout
        self.lock_timeout = lock_timeout
        self.run_id = f"{os.getpid()}{secrets.token_hex(2)}"
        self.dir = self.tmpdir / f"{TAG}-run-{self.run_id}"
        self.conf = self.dir / "slurm.conf"
        self.jobs_dir = self.tmpdir / "jobs"
        self.munge_socket = self.dir / "munge" / "munge.sock"
        self.netns = {n: f"{TAG}-{self.run_id}-{n}"[:40] for n in self.nodes}
        a, b = 100 + secrets.randbelow(150), secrets.randbelow(250)
        self.ips = {n: f"10.{a}.{b}.{i + 1}" for i, n in enumerate(self.nodes)}
        self._lock_fd: int | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "SlurmCluster":
        check_prerequisites(self.install)
        self._acquire_lock()
        try:
            cleanup_stale()
            self.dir.mkdir(parents=True, exist_ok=True)
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            self._start_munged()
            self._make_network()
            self._write_conf()
            self._start_slurm()
            self._wait_idle()
            self._started = True
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Tear everything down; safe to call repeatedly and after partial starts."""
        errors = []
        if self._lock_fd is None:
            return
        try:
            # slurm daemons first (by PID), then whatever is left in the namespaces (steps, job tasks)
            slurm_pids = [p.pid for name, p in self._procs.items() if name != "munged"]
            _kill_pids(slurm_pids, grace=5.0)
            left = []
            for ns in self.netns.values():
                left += _netns_pids(ns)
            _kill_pids(left, grace=2.0)
            for ns in self.netns.values():
                if ns in _netns_list():
                    p = _sh(["ip", "netns", "del", ns], check=False)
                    if p.returncode != 0:
                        errors.append(f"ip netns del {ns}: {p.stderr.strip()}")
            if "munged" in self._procs:
                _kill_pids([self._procs["munged"].pid], grace=3.0)
            for p in self._procs.values():
                with contextlib.suppress(Exception):
                    p.wait(timeout=1)
            self._procs.clear()
            try:
                _remove_hosts_lines(f"{HOSTS_MARK} {self.run_id}")
            except OSError as e:
                errors.append(f"/etc/hosts: {e}")
        finally:
            self._started = False
            self._release_lock()
        if errors:
            raise RuntimeError("SlurmCluster teardown problems: " + "; ".join(errors))

    def _acquire_lock(self) -> None:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(f"another SlurmCluster holds {LOCK_FILE} for > {self.lock_timeout}s")
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.run_id}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            self._lock_fd = None

    # -- pieces ---------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen:
        log = open(self.dir / f"{name}.stdout", "wb")
        try:
            p = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, preexec_fn=_set_pdeathsig, close_fds=True)
        finally:
            log.close()
        self._procs[name] = p
        return p

    def _start_munged(self) -> None:
        mdir = self.munge_socket.parent
        mdir.mkdir(parents=True, exist_ok=True)
        os.chmod(mdir, 0o711)
        key = mdir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o600)
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={mdir / 'munged.pid'}",
                               f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'munged.seed'}"])
        deadline = time.monotonic() + 15
        while not self.munge_socket.exists():
            if self._procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start:\n{self._log_tail(mdir / 'munged.log')}"
                                   f"{self._log_tail(self.dir / 'munged.stdout')}")
            time.sleep(0.05)

    def _make_network(self) -> None:
        for ns in self.netns.values():
            _sh(["ip", "netns", "add", ns])
        first, *rest = self.nodes
        # a veth pair per extra node; the first node gets one end of each (2 nodes: one pair)
        for i, node in enumerate(rest):
            _sh(["ip", "-n", self.netns[first], "link", "add", f"veth{i}", "type", "veth",
                 "peer", "name", "eth0", "netns", self.netns[node]])
        if len(rest) > 1:  # a bridge in the first node joins all pairs
            _sh(["ip", "-n", self.netns[first], "link", "add", "br0", "type", "bridge"])
            for i in range(len(rest)):
                _sh(["ip", "-n", self.netns[first], "link", "set", f"veth{i}", "master", "br0", "up"])
            dev0 = "br0"
        else:
            dev0 = "veth0"
        _sh(["ip", "-n", self.netns[first], "addr", "add", f"{self.ips[first]}/24", "dev", dev0])
        _sh(["ip", "-n", self.netns[first], "link", "set", dev0, "up"])
        for node in rest:
            _sh(["ip", "-n", self.netns[node], "addr", "add", f"{self.ips[node]}/24", "dev", "eth0"])
            _sh(["ip", "-n", self.netns[node], "link", "set", "eth0", "up"])
        for ns in self.netns.values():
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        _add_hosts_lines([f"{self.ips[n]}\t{n}\t{HOSTS_MARK} {self.run_id}" for n in self.nodes])

    def _write_conf(self) -> None:
        d = self.dir
        (d / "state").mkdir(exist_ok=True)
        for n in self.nodes:
            (d / "spool" / n).mkdir(parents=True, exist_ok=True)
        head = self.nodes[0]
        lines = [
            f"ClusterName={TAG}",
            f"SlurmctldHost={head}({self.ips[head]})",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=5",
            "InactiveLimit=0",
            "MinJobAge=3600",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'slurmd.%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for n in self.nodes:
            lines.append(f"NodeName={n} NodeAddr={self.ips[n]} CPUs={self.cpus} RealMemory={self.real_memory} "
                         "State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _in_node(self, node: str, shell_cmd: str) -> list[str]:
        # nsenter + unshare exec in place, so the Popen pid is the daemon's pid. Not `ip netns exec`:
        # it remounts /sys and slurmd 22.05 then fails on the missing cgroup mount.
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "--uts",
                "sh", "-c", f"hostname {shlex.quote(node)} && exec {shell_cmd}"]

    def _start_slurm(self) -> None:
        head, q = self.nodes[0], shlex.quote
        env_conf = f"SLURM_CONF={self.conf}"
        self._spawn("slurmctld", self._in_node(head, f"env {q(env_conf)} {q(_which('slurmctld'))} -D -i -f {q(str(self.conf))}"))
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", self._in_node(n, f"env {q(env_conf)} {q(_which('slurmd'))} -D -f {q(str(self.conf))}"))

    def _check_daemons(self) -> None:
        for name, p in self._procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}\n{self.logs()}")

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_daemons()
            p = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10)
            last = p.stdout + p.stderr
            states = dict(line.split()[:2] for line in p.stdout.splitlines() if len(line.split()) >= 2)
            if all(states.get(n, "").rstrip("*") == "idle" for n in self.nodes):
                return
            time.sleep(0.25)
        raise RuntimeError(f"nodes not idle after {self.startup_timeout}s: {last}\n{self.logs()}")

    # -- public API -----------------------------------------------------------------------------
    def client_env(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for Slurm clients and (via --export=ALL) for jobs."""
        # a job must not inherit the submitter's Slurm or torch-launcher variables (a rank or world size of the
        # test process would make every task think it is the only rank)
        e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
             and k not in LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}
        bindir = os.path.dirname(sys.executable)
        e["PATH"] = os.pathsep.join([bindir] + [p for p in e.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                              if p and p != bindir] + ["/usr/sbin", "/sbin"])
        if sys.prefix != sys.base_prefix:
            e["VIRTUAL_ENV"] = sys.prefix
        pp = [str(REPO_ROOT)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO_ROOT)]
        e["PYTHONPATH"] = os.pathsep.join(pp)
        e.setdefault("OMP_NUM_THREADS", "1")
        e["SLURM_CONF"] = str(self.conf)
        if env:
            e.update({k: str(v) for k, v in env.items()})
        return e

    def run(self, argv: Sequence[str], *, node: str | None = None, env: Mapping[str, str] | None = None,
            check: bool = True, timeout: float = 60, cwd=None) -> subprocess.CompletedProcess:
        """Run a command (e.g. a Slurm client) inside a node's network namespace (default: n1)."""
        node = node or self.nodes[0]
        cmd = ["nsenter", f"--net=/run/netns/{self.netns[node]}", *map(str, argv)]
        return _sh(cmd, check=check, timeout=timeout, env=self.client_env(env), cwd=cwd or REPO_ROOT)

    def scontrol(self, *args: str, check: bool = True) -> str:
        return self.run(["scontrol", *args], check=check).stdout

    def submit(self, script_path, env: Mapping[str, str] | None = None, args: Sequence[str] = (), *,
               sbatch_args: Sequence[str] = (), cwd=None, output=None) -> int:
        """sbatch a script (inside n1's namespace); returns the job id. Output: :meth:`output_path`."""
        sbatch_args = [str(a) for a in sbatch_args]
        has_output = any(a in ("-o", "--output") or a.startswith(("--output=", "-o")) for a in sbatch_args)
        cmd = ["sbatch", "--parsable", f"--chdir={Path(cwd or REPO_ROOT).resolve()}"]
        if output is not None:
            cmd.append(f"--output={output}")
        elif not has_output:
            cmd.append(f"--output={self.jobs_dir}/slurm-%j.out")
        cmd += [*sbatch_args, str(Path(script_path).resolve()), *map(str, args)]
        p = self.run(cmd, env=env, cwd=cwd)
        return int(p.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict:
        p = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False, timeout=20)
        if p.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {p.stderr.strip()}")
        return _parse_scontrol(p.stdout)

    def output_path(self, job_id: int, info: dict | None = None) -> Path:
        info = info or self.job_info(job_id)
        return Path(info.get("StdOut") or self.jobs_dir / f"slurm-{job_id}.out")

    def wait(self, job_id: int, timeout: float = 120, poll: float = 0.2) -> JobResult:
        """Poll `scontrol show job` until the job ends; cancel it and raise SlurmJobTimeout on timeout."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while True:
            try:
                info = self.job_info(job_id)
            except (RuntimeError, subprocess.TimeoutExpired):  # slurmctld busy: retry until the deadline
                if time.monotonic() > deadline:
                    raise
                self._check_daemons()
                time.sleep(1.0)
                continue
            state = info.get("JobState", "")
            if state in TERMINAL_STATES:
                ec, _, sig = info.get("ExitCode", "0:0").partition(":")
                return JobResult(job_id, state, int(ec or 0), int(sig or 0), self.output_path(job_id, info), info)
            if time.monotonic() > deadline:
                self.run(["scancel", str(job_id)], check=False)
                out = self.output_path(job_id, info)
                tail = out.read_text(errors="replace")[-3000:] if out.exists() else "(no output file)"
                raise SlurmJobTimeout(f"job {job_id} still {state} after {timeout}s (cancelled); "
                                      f"reason={info.get('Reason')}\n--- output tail ---\n{tail}\n{self.logs()}")
            self._check_daemons()
            time.sleep(poll)

    def submit_and_wait(self, script_path, env=None, args=(), *, timeout: float = 120, **kw) -> JobResult:
        return self.wait(self.submit(script_path, env=env, args=args, **kw), timeout=timeout)

    def logs(self, tail: int = 2000) -> str:
        """Tails of the daemons' logs, for failure messages."""
        parts = []
        for f in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.stdout")):
            parts.append(self._log_tail(f, tail))
        return "".join(parts)

    @staticmethod
    def _log_tail(path: Path, tail: int = 2000) -> str:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- {path.name} ---\n{text[-tail:]}\n" if text.strip() else ""


def _parse_scontrol(text: str) -> dict:
    """Parse one-line `scontrol show ... -o` output into a dict (values may contain spaces only at the end)."""
    out = {}
    for m in re.finditer(r"(\S+?)=(\S*)", text.strip().splitlines()[0] if text.strip() else ""):
        out.setdefault(m.group(1), m.group(2))
    return out


@contextlib.contextmanager
def slurm_cluster_or_skip(tmpdir, **kw):
    """Like ``SlurmCluster(tmpdir, **kw)`` but ``pytest.skip``s (with the reason) where it cannot work."""
    import pytest

    try:
        cluster = SlurmCluster(tmpdir, **kw)
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(f"Slurm test cluster unavailable: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
