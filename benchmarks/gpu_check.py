"""``make gpu``: everything fira_dist can check on one CUDA GPU, in one command, in under 8 minutes.

    make gpu                                        # = python3 benchmarks/gpu_check.py --venv .venv-gpu
    make gpu GPU_TORCH_SPEC='torch==2.13.0' GPU_PIP_ARGS='--no-index --find-links .whl'   # wheels you carried
    make gpu GPU_ARGS=--offline                     # no pip at all: the CUDA torch this machine already has
    python3 benchmarks/gpu_check.py --help

Stages, each a subprocess under a hard time cap (killed with its process group when the cap is reached; the
next stage still runs), all of them inside one overall budget (``--budget``, 450 s):

- probe (15 s, always): ``nvidia-smi`` gives the GPU's name, memory and driver. No GPU (nor /dev/nvidia0, nor a
  torch here that sees one): exit 3 before anything is installed.
- setup (150 s): the environment. ``.venv-gpu`` with ``pip install $GPU_TORCH_SPEC`` (PyPI's Linux torch wheels
  are CUDA builds) and ``pip install -e .[test]``, reused while the spec and pyproject.toml are unchanged. If pip
  cannot reach an index (a lent GPU machine often has no network), fails, runs into the cap or brings a CPU-only
  torch, the check uses a CUDA torch already on the machine (the first of ``--reuse-python``, this interpreter,
  ``python3``, ``python`` whose ``torch.cuda.is_available()``) with the repository on ``PYTHONPATH``, and says so
  in its report; packages missing there can come from carried wheels (``--wheels DIR``), and a stage whose
  packages are missing is reported as skipped, naming them. No CUDA torch anywhere: exit 4.
- tests (120 s): ``pytest -m gpu tests/test_gpu.py``: the fused low-rank Adam kernel on CUDA against the
  elementwise form (fp32, bf16), Fira steps on CUDA in fp32 and bf16 against CPU, DeepSpeed ZeRO-2 on one GPU
  with NCCL and FSDP2 on one GPU against a one-process run.
- bench (90 s): optimizer step times on the GPU, ``fira_dist.Fira`` / ``fira.FiraAdamW`` /
  ``torch.optim.AdamW(fused=True)`` on the low-rank matrices of LLaMA-60M, -130M, -1B and one LLaMA-7B layer
  (benchmarks/optimizer_step.py's shapes and ranks), with each step's transient memory, the state, and the
  projectors alone.
- pretrain (60 s): ``fira-dist pretrain --model llama_60m --strategy single --bf16``, 100 steps of 32 x 256
  tokens: tokens/s and peak CUDA memory.

Caps: 15 + 150 + 120 + 90 + 60 = 435 s; the overall budget (450 s) also bounds them (a stage gets at most what is
left), and what runs outside the stages (this script's start, the report) takes a few seconds: the command ends
in under 7.7 min even when every stage runs into its cap.

Why the work fits its caps, estimated for an H100 PCIe (2.0 TB/s HBM, 51 TFLOP/s fp32 without tensor cores;
TF32 stays off, torch's default; an SXM H100 or H200 is faster), since no GPU was lent when this was written:

- bench, per steady step (``SIZES`` below; mn = the sum of m*n over the low-rank matrices). fira_dist does 2
  products of 2*mn*r FLOPs and ~4 passes over the fp32 gradients; the reference 3 products and ~8 passes plus
  ~20 small kernels per matrix; fused AdamW moves 28 bytes a parameter. LLaMA-1B (mn = 1.21e9, r = 512): 2.5
  TFLOP -> ~50 ms + ~10 ms of passes for ours, ~100 ms for the reference, 34 GB -> ~17 ms for AdamW: a round
  of the three ~0.2 s, 3 warm-up + 10 timed + 1 memory round ~3 s. The first step needs projectors: they come
  from the randomized range finder for both Fira implementations (the reference's SVD is swapped for it during
  the benchmark; a steady step's cost does not depend on how its projector was found), ~3 TFLOP plus 168
  eigensolves of 520 x 520, ~3 s per optimizer. LLaMA-60M / -130M (mn = 2.5e7 / 8.5e7) are bound by kernel
  launches: ~56-84 matrices x ~20 kernels x ~5-10 us = 5-20 ms a step, under 2 s each. One 7B layer (mn =
  2.0e8, r = 64): ~5 ms a step. The projectors alone (exact SVD and randomized, one matrix of each distinct
  shape; cuSOLVER's SVD of 4096 x 11008 takes seconds): ~15 s for all four sizes. Total ~35 s for a 90 s cap;
  weights, gradients and AdamW state of 1B take ~35 GB of GPU memory, freed before the next size. A size or a
  projector measurement that would start after the stage's own deadline is reported as not measured.
- pretrain: llama_60m with the embedded 8192-token vocabulary has 33.7M parameters: 6 * 33.7M * 8192 tokens =
  1.7 TFLOP a step in bf16 (~15 ms even at 15% of peak) plus Fira's step (~10 ms): ~3 s for 100 steps, after
  ~15 s of imports, tokenizing the embedded corpus and the first SVDs. ~20 s for a 60 s cap.
- tests: the kernel and optimizer tests take well under a second each on a GPU; the three one-GPU pretraining
  launches (4 toy steps each) run side by side, ~25 s (imports, NCCL start). ~40 s with pytest's start.
- setup: with the venv in place, ~3 s (one interpreter start to check torch.cuda). A first install downloads
  torch's CUDA build (~3 GB with its NVIDIA libraries), 1-2 min on a fast link: over the cap it falls back to a
  CUDA torch already on the machine (or exits 4), and the next run reuses whatever pip finished.

Output: the stage table, the step-time table, the pretraining line (formats in README.md, "GPU figures"), and all
of it as JSON in ``--json`` (``results/gpu/gpu_check.json``); each stage's full log is ``results/gpu/<stage>.log``.

Exit codes: 0 every stage passed; 1 a stage failed or ran into its cap (the stage table says which); 2 bad
arguments; 3 no CUDA GPU on this machine (``nvidia-smi`` lists none, no ``/dev/nvidia0``, and no torch here sees
one): nothing was installed or run; 4 a GPU is there but no CUDA-enabled torch could be installed or found.
(``make gpu`` reports the script's code as "Error 3" and itself exits 2, as make does for any failed recipe.)

``--cpu-rehearsal`` runs the stages on CPU with this interpreter, at toy size, without probe or setup: a check
of this script on a machine without a GPU (tests/test_benchmarks.py runs it). Its figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA, EXIT_NO_CUDA_TORCH = 0, 1, 2, 3, 4
STAGES = ("setup", "tests", "bench", "pretrain")  # the probe always runs (outside the CPU rehearsal)
CAPS = {"probe": 15, "setup": 150, "tests": 120, "bench": 90, "pretrain": 60}
BUDGET = 450
GPU_SIZES = "60m,130m,1b,7b_layer"
STAMP = ".fira_gpu_ready.json"
WHEELS_SITE = "wheels-site"  # in the --venv folder: what --wheels installs next to the machine's own torch
# what each stage needs in the environment (module names); a stage whose needs are missing is skipped, said why
NEEDS = {"tests": ("torch", "fira_dist", "pytest"), "bench": ("torch", "fira_dist"),
         "pretrain": ("torch", "fira_dist", "transformers", "datasets", "tokenizers")}
MODULES = ("torch", "fira_dist", "pytest", "deepspeed", "transformers", "datasets", "tokenizers", "fira")
TORCH_PROBE = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
               "'cuda': torch.version.cuda, 'available': c, 'devices': torch.cuda.device_count() if c else 0, "
               "'name': torch.cuda.get_device_name(0) if c else None}))")


# ----------------------------------------------------------------------------------------------- processes
def run_capped(cmd: list[str], timeout: float, log: Path | None = None, env: dict | None = None,
               echo: bool = True, cwd: Path = REPO) -> tuple[int | None, str]:
    """Run cmd in its own process group for at most `timeout` s; (exit code or None on timeout, output).

    Output goes to the terminal as it comes (echo) and to `log` (appended). On timeout the whole process group
    gets SIGTERM, then SIGKILL 5 s later."""
    out: list[str] = []
    fh = open(log, "a") if log else None
    if fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env, cwd=cwd, start_new_session=True)
    except OSError as err:
        if fh:
            fh.write(f"{err}\n")
            fh.close()
        return 127, str(err)

    def pump():
        for line in proc.stdout:
            out.append(line)
            if fh:
                fh.write(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=max(0.1, timeout))
    except subprocess.TimeoutExpired:
        rc = None
        # SIGTERM first (a trainer checkpoints on it), then SIGKILL for all that is left: the stage's time is up,
        # and nothing it started may outlive it (torchrun puts its workers in sessions of their own, so the
        # descendants are listed too, before the signals orphan them)
        family = _descendants(proc.pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            for pid in family:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
    reader.join(timeout=5)
    if fh:
        fh.write(f"[gpu_check] exit {rc if rc is not None else 'TIMEOUT'}\n")
        fh.close()
    return rc, "".join(out)


def _descendants(pid: int) -> list[int]:
    """Every live process below pid (from /proc's parent links; empty where /proc is not there)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# ----------------------------------------------------------------------------------------------- probe
def probe_gpu() -> dict:
    """What this machine says about NVIDIA GPUs, without torch: nvidia-smi's list and /dev/nvidia0."""
    info: dict = {"nvidia_smi": shutil.which("nvidia-smi"), "dev_nvidia0": os.path.exists("/dev/nvidia0"),
                  "gpus": []}
    if info["nvidia_smi"]:
        rc, out = run_capped([info["nvidia_smi"], "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], CAPS["probe"], echo=False)
        if rc == 0:
            info["gpus"] = [[x.strip() for x in line.split(",")] for line in out.splitlines() if line.count(",") >= 2]
        else:
            info["nvidia_smi_error"] = last_line(out) or f"exit {rc}"
    return info


def torch_probe(python: str, env: dict | None = None, timeout: float = 60) -> dict | None:
    """torch's view from `python` (version, CUDA build, device): None if torch cannot be imported there."""
    rc, out = run_capped([python, "-c", TORCH_PROBE], timeout, env=env, echo=False)
    if rc != 0:
        return None
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------------------------- setup
class Env:
    """The interpreter the stages run with, and what it has."""

    def __init__(self, python: str, pythonpath: list[str], how: str, torch_info: dict):
        self.python, self.pythonpath, self.how, self.torch = python, pythonpath, how, torch_info
        self.modules: dict[str, bool] = {}

    def environ(self, device: str) -> dict[str, str]:
        env = dict(os.environ)
        paths = self.pythonpath + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "FIRA_DIST_NO_TQDM": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": device})
        bindir = os.path.dirname(self.python)  # torchrun / deepspeed / fira-dist of this environment first
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        return env

    def check_modules(self, device: str, timeout: float = 60) -> None:
        code = ("import importlib.util, json, sys; "
                "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))")
        rc, out = run_capped([self.python, "-c", code, *MODULES], timeout, env=self.environ(device), echo=False)
        try:
            self.modules = json.loads(out.strip().splitlines()[-1]) if rc == 0 else {}
        except (ValueError, IndexError):
            self.modules = {}

    def missing(self, stage: str) -> list[str]:
        return [m for m in NEEDS.get(stage, ()) if not self.modules.get(m)]


def _stamp_key(args) -> dict:
    pyproject = REPO / "pyproject.toml"
    return {"torch_spec": args.torch_spec, "pip_args": args.pip_args,
            "pyproject_mtime": pyproject.stat().st_mtime if pyproject.exists() else 0}


def _venv_python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def setup_env(args, deadline: float, log: Path, notes: list[str]) -> Env | None:
    """Build or reuse the GPU environment (see the module docstring); None if no CUDA torch can be had."""
    venv = Path(args.venv).resolve()
    stamp = venv / STAMP
    pip_flags = ["-q", "--retries", "1", "--timeout", "20", *args.pip_args.split()]
    if not args.offline:
        if stamp.exists() and json.loads(stamp.read_text()).get("key") == _stamp_key(args):
            info = torch_probe(_venv_python(venv), timeout=max(5, deadline - time.monotonic()))
            if info and info["available"]:
                notes.append(f"reused {venv.name} (torch {info['torch']}, CUDA {info['cuda']}; made by `pip install "
                             f"{args.torch_spec} -e .[test]`)")
                return Env(_venv_python(venv), [], "venv", info)
            notes.append(f"{venv.name} exists but its torch does not see the GPU: made again")
        if (venv / "pyvenv.cfg").exists() or (venv.is_dir() and {p.name for p in venv.iterdir()} <= {WHEELS_SITE}):
            shutil.rmtree(venv)  # ours: a venv, or the carried wheels of an earlier run without pip
        elif venv.exists():
            notes.append(f"{venv} exists and is no virtual environment: left alone, pip not tried")
        steps = [] if venv.exists() else [
            ([sys.executable, "-m", "venv", str(venv)], "python -m venv"),
            ([_venv_python(venv), "-m", "pip", "install", *pip_flags, args.torch_spec],
             f"pip install {args.torch_spec}"),
            ([_venv_python(venv), "-m", "pip", "install", *pip_flags, "-e", f"{REPO}[test]"], "pip install -e .[test]")]
        failed = None
        for cmd, what in steps:
            rc, out = run_capped(cmd, deadline - time.monotonic(), log=log, echo=False)
            if rc != 0:
                failed = f"{what} {'ran into the setup cap' if rc is None else f'failed (exit {rc})'}: {last_line(out)}"
                break
        if steps and failed is None:
            info = torch_probe(_venv_python(venv), timeout=max(5, deadline - time.monotonic()))
            if info and info["available"]:
                stamp.write_text(json.dumps({"key": _stamp_key(args), "torch": info}))
                notes.append(f"made {venv.name}: pip install {args.torch_spec} -e .[test] -> torch {info['torch']}, "
                             f"CUDA {info['cuda']}")
                return Env(_venv_python(venv), [], "venv", info)
            failed = (f"pip installed torch {info['torch']}, a CPU-only build: name CUDA wheels with GPU_TORCH_SPEC / "
                      f"GPU_PIP_ARGS (e.g. an --index-url of CUDA builds)" if info and not info["cuda"]
                      else f"torch in {venv.name} does not see the GPU: {info}")
        if failed:
            notes.append(failed)
        if (venv / "pyvenv.cfg").exists():
            shutil.rmtree(venv)  # a half-made venv must not shadow anything on the next run
    else:
        notes.append("--offline: pip not tried")
    # fall back to a CUDA torch already on this machine, fira_dist from the repository on PYTHONPATH
    # (by path, not realpath: a virtual environment's python links to its base interpreter but has its own packages)
    seen, candidates = [], [args.reuse_python, sys.executable, shutil.which("python3"), shutil.which("python")]
    for cand in candidates:
        if not cand or os.path.abspath(cand) in seen:
            continue
        seen.append(os.path.abspath(cand))
        info = torch_probe(cand, timeout=max(5, min(60, deadline - time.monotonic())))
        if info and info["available"]:
            pythonpath = [str(REPO)]
            if args.wheels:
                site = venv / WHEELS_SITE
                wheels = sorted(str(p) for p in Path(args.wheels).glob("*.whl"))
                rc, out = run_capped([cand, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade",
                                      "--target", str(site), *wheels], max(5, deadline - time.monotonic()), log=log,
                                     echo=False)
                notes.append(f"installed {len(wheels)} wheels from {args.wheels} into {site}" if rc == 0 else
                             f"installing the wheels of {args.wheels} failed: {last_line(out)}")
                pythonpath.append(str(site))
            notes.append(f"used the CUDA torch already on this machine: {cand} (torch {info['torch']}, CUDA "
                         f"{info['cuda']}), fira_dist from {REPO} on PYTHONPATH; nothing was installed into it")
            return Env(cand, pythonpath, "machine", info)
    notes.append("no CUDA-enabled torch found in " + ", ".join(seen))
    return None


# ----------------------------------------------------------------------------------------------- bench (in the env)
def _state_bytes(opt) -> int:
    import torch

    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif isinstance(getattr(v, "ortho_matrix", None), torch.Tensor):  # the reference's projector object
                total += v.ortho_matrix.numel() * v.ortho_matrix.element_size()
    return total


@contextlib.contextmanager
def randomized_reference_projector():
    """fira.FiraAdamW's projectors from fira_dist's randomized range finder instead of a full SVD (first step of
    the steady-step benchmark only: the steady step's cost does not depend on how its projector was found)."""
    try:
        from fira.gradient_projection import GradientProjector
    except ImportError:
        yield
        return
    import torch

    from fira_dist.projector import compute_projector

    orig = GradientProjector.get_orthogonal_matrix

    def fast(self, weights, rank, type):
        if type not in ("left", "right"):
            return orig(self, weights, rank, type)
        gen = torch.Generator(device=weights.device).manual_seed(0)
        return compute_projector(weights, rank, type, kind="randomized", generator=gen).to(weights.dtype)

    GradientProjector.get_orthogonal_matrix = fast
    try:
        yield
    finally:
        GradientProjector.get_orthogonal_matrix = orig


def bench(sizes: list[str], steps: int, device: str, deadline: float, on_row=None) -> dict:
    """Steady-step times etc. for each size (see the module docstring); runs in the GPU environment.
    ``on_row(result, final)`` is called after each measurement with the result so far, ``final`` once a size is
    done (so a stage cut short keeps what it measured)."""
    import statistics

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from optimizer_step import SIZES, interleaved, layer_shapes, make, matrices

    from fira_dist.projector import compute_projector, side_for

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    have_reference = importlib.util.find_spec("fira") is not None  # the test extra's fira==1.0.2
    kinds = ["fira_dist", "reference", "adamw_fused"] if have_reference else ["fira_dist", "adamw_fused"]

    def step(opt, params, grads) -> float:
        for p, g in zip(params, grads):
            p.grad = g
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        return time.perf_counter() - t0

    info = {"device": device, "torch": torch.__version__, "steps": steps}
    if cuda:
        info.update(name=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))
    rows: list[dict] = []
    result = {"info": info, "rows": rows}

    def save(final: bool = False) -> None:  # after every measurement: a stage cut short keeps what it measured
        if on_row:
            on_row(result, final)

    def measure(row: dict, hidden: int, inter: int, layers: int, rank: int) -> None:
        mats = matrices(hidden, inter, layers, device=device)
        grads = [g for _, g in mats]
        runs = {}
        with randomized_reference_projector():
            for kind in kinds:
                params = [torch.nn.Parameter(w.clone()) for w, _ in mats]
                opt = make(kind, params, rank, gap=10**9, projector="randomized")
                for _ in range(3):  # the first step finds the projectors; two more to warm up
                    step(opt, params, grads)
                runs[kind] = (opt, params)
        del mats
        times = interleaved({k: (lambda o=o, p=p: step(o, p, grads)) for k, (o, p) in runs.items()}, steps)
        for kind, ts in times.items():
            row[f"step_{kind}_ms"] = 1e3 * statistics.median(ts)
            opt, params = runs[kind]
            row[f"state_{kind}_mib"] = _state_bytes(opt) / 2**20
            if cuda:  # what one step allocates on top of what is already there
                for p, g in zip(params, grads):
                    p.grad = g
                sync()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                opt.step()
                sync()
                row[f"transient_{kind}_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        runs.clear()
        save()
        # the projectors alone, one matrix of each distinct shape (what a refresh adds, per matrix)
        proj: dict = {"svd": {}, "randomized": {}}
        row["projector_ms"] = proj
        for shape in sorted(set(layer_shapes(hidden, inter))):
            if time.monotonic() > deadline:
                row["projector_note"] = "the rest not measured: the bench stage's time cap"
                break
            g = next(gr for gr in grads if tuple(gr.shape) == shape)
            side = side_for(g.shape, "std")
            for kind in ("randomized", "svd"):
                gen = torch.Generator(device=g.device).manual_seed(0)
                compute_projector(g[:64, :64], 16, side, kind=kind, generator=gen)  # library start-up
                sync()
                t0 = time.perf_counter()
                compute_projector(g, rank, side, kind=kind, generator=gen)
                sync()
                proj[kind][f"{shape[0]}x{shape[1]}"] = 1e3 * (time.perf_counter() - t0)
            save()

    for name in sizes:
        hidden, inter, layers, rank = SIZES[name]
        row: dict = {"size": name, "hidden": hidden, "intermediate": inter, "layers": layers, "rank": rank,
                     "matrices": 7 * layers}
        rows.append(row)
        if time.monotonic() > deadline:
            row["not_measured"] = "the bench stage's time cap"
        else:
            try:
                measure(row, hidden, inter, layers, rank)
            except torch.cuda.OutOfMemoryError as err:  # a smaller GPU: say so, go on with the next size
                for key in [k for k in row if k.startswith(("step_", "state_", "transient_", "projector"))]:
                    del row[key]
                row["not_measured"] = f"out of GPU memory ({str(err).splitlines()[0][:120]})"
        if cuda:
            torch.cuda.empty_cache()
        save(final=True)
    return result


def _ms(row: dict, kind: str) -> str:
    v = row.get(f"step_{kind}_ms")
    return "-" if v is None else f"{v:.2f}"


def _mib(row: dict, key: str) -> str:
    v = row.get(key)
    return "-" if v is None else f"{v:.0f}"


def _ratio(row: dict, a: str, b: str) -> str:
    x, y = row.get(f"step_{a}_ms"), row.get(f"step_{b}_ms")
    return "-" if x is None or y is None else f"{x / y:.2f}x"


STEP_COLUMNS = ["model", "matrices", "rank", "fira_dist (ms)", "fira.FiraAdamW (ms)", "AdamW fused (ms)", "ours/ref",
                "ours/AdamW", "step transient: ours / ref / AdamW (MiB)", "state: ours / ref / AdamW (MiB)",
                "projector of one matrix per shape: SVD / randomized (ms)"]


def step_table(result: dict) -> list[str]:
    lines = ["| " + " | ".join(STEP_COLUMNS) + " |", "|" + "---|" * len(STEP_COLUMNS)]
    for r in result["rows"]:
        label = f"llama_{r['size']}".replace("_7b_layer", "_7b (1 layer)")
        if "not_measured" in r:
            lines.append(f"| {label} | {r['matrices']} | {r['rank']} | not measured: {r['not_measured']} |")
            continue
        kinds = ("fira_dist", "reference", "adamw_fused")
        proj = r.get("projector_ms", {})
        pj = ", ".join(f"{s} {proj['svd'][s]:.1f} / {proj['randomized'][s]:.1f}"
                       for s in proj.get("svd", {}) if s in proj.get("randomized", {})) or "-"
        lines.append(f"| {label} | {r['matrices']} | {r['rank']} | {_ms(r, 'fira_dist')} | {_ms(r, 'reference')} | "
                     f"{_ms(r, 'adamw_fused')} | {_ratio(r, 'fira_dist', 'reference')} | "
                     f"{_ratio(r, 'fira_dist', 'adamw_fused')} | "
                     f"{' / '.join(_mib(r, f'transient_{k}_mib') for k in kinds)} | "
                     f"{' / '.join(_mib(r, f'state_{k}_mib') for k in kinds)} | {pj} |")
    return lines


# ----------------------------------------------------------------------------------------------- the check
def pretrain_cmd(args, env: Env, out: Path) -> list[str]:
    return [env.python, "-m", "fira_dist.cli", "pretrain", "--model", args.pretrain_model, "--strategy", "single",
            "--device", args.device, *(["--bf16"] if args.device == "cuda" else []), "--max-steps",
            str(args.pretrain_steps), "--micro-batch-size", str(args.pretrain_micro_batch), "--seq-len",
            str(args.pretrain_seq_len), "--eval-every", "0", "--save-every", "0", "--no-tensorboard", "--resume",
            "none", "--log-every", str(max(1, args.pretrain_steps // 5)), "--output-dir", str(out)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Exit codes: 0 all passed, 1 a stage "
                                "failed or hit its cap, 2 bad arguments, 3 no CUDA GPU here, 4 no CUDA torch could "
                                "be installed or found.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", default=".venv-gpu", help="the GPU environment's folder (.venv-gpu)")
    p.add_argument("--torch-spec", default="torch==2.13.0", help="what pip installs as torch (torch==2.13.0)")
    p.add_argument("--pip-args", default="", help="more pip flags, e.g. '--no-index --find-links .whl'")
    p.add_argument("--offline", action="store_true", help="do not run pip: use a CUDA torch already here")
    p.add_argument("--reuse-python", help="the interpreter whose CUDA torch to use when pip cannot make one")
    p.add_argument("--wheels", help="a folder of wheels for packages missing next to the machine's torch")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated, from {','.join(STAGES)} (the GPU probe always runs)")
    p.add_argument("--budget", type=float, default=BUDGET, help=f"seconds for everything ({BUDGET})")
    p.add_argument("--sizes", default=None, help=f"bench sizes ({GPU_SIZES}; rehearsal: toy)")
    p.add_argument("--steps", type=int, default=10, help="timed steady steps per optimizer (10)")
    p.add_argument("--pretrain-model", default=None, help="llama_60m (rehearsal: llama_tiny)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="100 (rehearsal: 3)")
    p.add_argument("--pretrain-micro-batch", type=int, default=None, help="32 (rehearsal: 2)")
    p.add_argument("--pretrain-seq-len", type=int, default=None, help="256 (rehearsal: 32)")
    p.add_argument("--json", default="results/gpu/gpu_check.json", help="where the results go as JSON")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="run the stages on CPU with this interpreter at toy size (checks this script; no GPU figures)")
    p.add_argument("--bench-stage", metavar="OUT_JSON", help=argparse.SUPPRESS)  # internal: the bench subprocess
    p.add_argument("--bench-deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    rehearsal = args.cpu_rehearsal
    args.device = "cpu" if rehearsal else "cuda"
    defaults = {"sizes": ("toy", GPU_SIZES), "pretrain_model": ("llama_tiny", "llama_60m"),
                "pretrain_steps": (3, 100), "pretrain_micro_batch": (2, 32), "pretrain_seq_len": (32, 256)}
    for key, (cpu, gpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, cpu if rehearsal else gpu)
    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        p.error(f"--stages {args.stages!r} not accepted: expected a comma-separated subset of {','.join(STAGES)}")
    args.stages = stages
    sys.path.insert(0, str(REPO / "benchmarks"))
    known = ("60m", "130m", "1b", "7b_layer", "toy")  # optimizer_step.SIZES, without importing torch here
    sizes = args.sizes.split(",")
    if any(s not in known for s in sizes):
        p.error(f"--sizes {args.sizes!r} not accepted: expected a comma-separated subset of {','.join(known)}")
    args.sizes = sizes
    for key in ("steps", "pretrain_steps", "pretrain_micro_batch", "pretrain_seq_len"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}={getattr(args, key)} not accepted: expected an integer >= 1")
    if args.budget <= 0:
        p.error(f"--budget={args.budget} not accepted: expected seconds > 0")
    if args.wheels and not Path(args.wheels).is_dir():
        p.error(f"--wheels={args.wheels!r} not accepted: no such folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.bench_stage:  # inside the GPU environment: measure, print the table row by row, write the JSON
        deadline = time.monotonic() + (args.bench_deadline or CAPS["bench"]) - 5

        def on_row(result: dict, final: bool) -> None:
            Path(args.bench_stage).write_text(json.dumps(result, indent=1))
            if final:
                print(step_table(result)[-1], flush=True)

        print("\n".join(step_table({"rows": []})), flush=True)
        bench(args.sizes, args.steps, args.device, deadline, on_row)
        return 0
    t0 = time.monotonic()
    end = t0 + args.budget
    out_json = Path(args.json) if os.path.isabs(args.json) else REPO / args.json
    logs = out_json.parent  # made once there is a GPU (or in the rehearsal)
    report: dict = {"date": datetime.date.today().isoformat(), "rehearsal": args.cpu_rehearsal, "stages": {},
                    "setup_notes": []}
    stages = report["stages"]

    def record(name: str, status: str, started: float, cap: float, rc: int | None = None) -> None:
        stages[name] = {"status": status, "seconds": round(time.monotonic() - started, 1), "cap": cap, "rc": rc}
        print(f"[gpu_check] {name}: {status} ({stages[name]['seconds']} s, cap {cap} s)", flush=True)

    if args.cpu_rehearsal:
        logs.mkdir(parents=True, exist_ok=True)
        env = Env(sys.executable, [str(REPO)], "this interpreter (CPU rehearsal)", {})
        report["gpu"] = "none: CPU rehearsal, these are not GPU figures"
    else:
        # --- probe: is there a GPU at all? (before anything is installed)
        started = time.monotonic()
        gpu = probe_gpu()
        report["probe"] = gpu
        here = None
        if not gpu["gpus"] and not gpu["dev_nvidia0"]:
            here = torch_probe(sys.executable, timeout=30)
            if not (here and here["available"]):
                print("gpu_check: no CUDA GPU on this machine: " + ("nvidia-smi lists none" if gpu["nvidia_smi"]
                      else "no nvidia-smi") + ", no /dev/nvidia0, and " + (
                      f"torch {here['torch']} here says torch.cuda.is_available() is False" if here else
                      f"no torch in {sys.executable}") + f". Nothing was installed or run (exit {EXIT_NO_CUDA}). "
                      "Run `make gpu` on a machine with an NVIDIA GPU; `make test` is the CPU suite.",
                      file=sys.stderr, flush=True)
                return EXIT_NO_CUDA
        logs.mkdir(parents=True, exist_ok=True)
        report["gpu"] = gpu["gpus"][0][0] if gpu["gpus"] else (here or {}).get("name") or "an NVIDIA GPU"
        record("probe", "ok: " + ("; ".join(", ".join(g) for g in gpu["gpus"]) or report["gpu"]), started,
               CAPS["probe"])
        # --- setup
        started = time.monotonic()
        notes = report["setup_notes"]
        setup_log = logs / "setup.log"
        setup_log.write_text("")
        if "setup" in args.stages:
            env = setup_env(args, min(end, started + CAPS["setup"]), setup_log, notes)
        else:
            notes.append("setup not in --stages: this interpreter, fira_dist from the repository")
            info = torch_probe(sys.executable)
            env = Env(sys.executable, [str(REPO)], "this interpreter", info) if info else None
        for n in notes:
            print(f"[gpu_check] setup: {n}", flush=True)
        if env is None or not env.torch.get("available"):
            record("setup", "failed: no CUDA-enabled torch", started, CAPS["setup"])
            print(f"gpu_check: a GPU is here ({report['gpu']}) but no CUDA-enabled torch could be installed or found "
                  f"(exit {EXIT_NO_CUDA_TORCH}); see {setup_log}", file=sys.stderr, flush=True)
            report["exit_code"] = EXIT_NO_CUDA_TORCH
            _write(report, out_json)
            return EXIT_NO_CUDA_TORCH
        record("setup", f"ok: {env.how}", started, CAPS["setup"])
        report["torch"] = env.torch
    env.check_modules(args.device, timeout=max(5.0, min(60.0, end - time.monotonic())))
    report["environment"] = {"python": env.python, "how": env.how, "modules": env.modules}
    shell_env = env.environ(args.device)
    if args.cpu_rehearsal:
        shell_env["FIRA_GPU_TESTS_ON_CPU"] = "1"

    def stage(name: str, cmd: list[str]) -> tuple[int | None, str] | None:
        """Run one stage under min(its cap, what is left of the budget); None if it did not run (recorded)."""
        if name not in args.stages:
            return None
        started = time.monotonic()
        cap = min(CAPS[name], end - started)
        missing = env.missing(name)
        if missing:
            record(name, f"skipped: {', '.join(missing)} not installed in this environment", started, CAPS[name])
            return None
        if cap < 5:
            record(name, "not run: the overall budget is spent", started, CAPS[name])
            return None
        log = logs / f"{name}.log"
        log.write_text("")
        print(f"[gpu_check] {name} (cap {cap:.0f} s): {' '.join(cmd)}", flush=True)
        rc, out = run_capped(cmd, cap, log=log, env=shell_env)
        stages[name] = {"status": "", "seconds": round(time.monotonic() - started, 1), "cap": CAPS[name], "rc": rc}
        return rc, out

    def done(name: str, status: str) -> None:
        stages[name]["status"] = status
        print(f"[gpu_check] {name}: {status} ({stages[name]['seconds']} s, cap {stages[name]['cap']} s)", flush=True)

    # --- tests
    res = stage("tests", [env.python, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                          str(REPO / "tests" / "test_gpu.py")])
    if res:
        rc, out = res
        counts = re.findall(r"^=*\s*((?:\d+ \w+(?:, )?)+) in [\d.]+s", out, re.M)
        summary = counts[-1] if counts else last_line(out)
        done("tests", "TIMED OUT" if rc is None else
             (f"ok: {summary}" if rc == 0 else f"FAILED (exit {rc}): {summary}"))
    # --- bench
    bench_json = logs / "bench.json"
    with contextlib.suppress(FileNotFoundError):
        bench_json.unlink()
    cap = min(CAPS["bench"], end - time.monotonic())
    res = stage("bench", [env.python, str(Path(__file__).resolve()), "--bench-stage", str(bench_json),
                          "--bench-deadline", f"{cap:.0f}", "--sizes", ",".join(args.sizes), "--steps", str(args.steps),
                          *(["--cpu-rehearsal"] if args.cpu_rehearsal else [])])
    if res:
        rc, out = res
        if bench_json.exists():  # the rows measured, also when the stage was cut short
            report["bench"] = json.loads(bench_json.read_text())
        rows = sum("step_fira_dist_ms" in r for r in (report.get("bench") or {}).get("rows", []))
        n = f"{rows} of {len(args.sizes)} sizes"
        done("bench", f"ok: {n}" if rc == 0 and rows == len(args.sizes) else
             ("TIMED OUT" if rc is None else f"FAILED (exit {rc}): {last_line(out)}") + f" ({n} measured)")
    # --- pretrain
    run_dir = logs / f"pretrain_{args.pretrain_model}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = pretrain_cmd(args, env, run_dir)
    res = stage("pretrain", cmd)
    if res:
        rc, out = res
        summary_path = run_dir / "summary.json"
        if rc == 0 and summary_path.exists():
            s = json.loads(summary_path.read_text())
            mem = s["memory_per_rank"][0]
            report["pretrain"] = {"model": s["model"], "params": s["params"], "steps": s["end_step"],
                                  "tokens_per_step": s["tokens_per_step"], "tokens_per_s": s["tokens_per_s"],
                                  "peak_cuda_mib": mem.get("cuda_peak_mb"), "peak_rss_mib": mem.get("peak_rss_mb"),
                                  "loss_first": s["loss_first"], "loss_last": s["loss_last"], "bf16": s["bf16"],
                                  "wall_s": s["wall_s"], "command": "fira-dist " + " ".join(cmd[3:])}
            done("pretrain", "ok")
        else:
            done("pretrain", "TIMED OUT" if rc is None else f"FAILED (exit {rc}): {last_line(out)}")
    report["total_seconds"] = round(time.monotonic() - t0, 1)
    failed = [n for n, st in stages.items() if not st["status"].startswith(("ok", "skipped"))]
    report["exit_code"] = EXIT_FAILED if failed else EXIT_OK
    _write(report, out_json)
    print("\n" + "\n".join(format_report(report)), flush=True)
    print(f"\n[gpu_check] results: {out_json}; logs: {logs}/<stage>.log; exit {report['exit_code']}"
          + (f" (not ok: {', '.join(failed)})" if failed else ""), flush=True)
    return report["exit_code"]


def _write(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=1))


def format_report(report: dict) -> list[str]:
    """The printed report: heading, stage table, step-time table, pretraining table (README "GPU figures")."""
    t = report.get("torch") or {}
    b = (report.get("bench") or {}).get("info", {})
    head = f"## fira_dist GPU check, {report['date']}: {report.get('gpu')}"
    lines = [head, "", f"torch {t.get('torch', b.get('torch', '?'))}, CUDA {t.get('cuda', b.get('cuda', '-'))}; "
             f"environment: {(report.get('environment') or {}).get('how', '?')}; total {report['total_seconds']} s", "",
             "| stage | result | time (s) | cap (s) |", "|---|---|---|---|"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']} | {s['cap']} |")
    if report.get("bench"):
        info = report["bench"]["info"]
        where = info["device"] + (f" {info['name']}, TF32 matmul {'on' if info.get('tf32_matmul') else 'off'}"
                                  if info.get("name") else "")
        lines += ["", f"Optimizer step, {where}: fp32 weights and gradients of the low-rank matrices; steady step (no "
                  f"projector refresh), median of {info['steps']} steps, the optimizers taking turns", ""]
        lines += step_table(report["bench"])
    if report.get("pretrain"):
        p = report["pretrain"]
        mem = (f"{p['peak_cuda_mib']:,.0f}" if p.get("peak_cuda_mib") is not None
               else f"- (RSS {p['peak_rss_mib']:,.0f})")
        lines += ["", f"Pretraining: {p['command']}", "",
                  "| model | params | steps | tokens/step | tokens/s | peak CUDA memory (MiB) | loss first -> last |",
                  "|---|---|---|---|---|---|---|",
                  f"| {p['model']} | {p['params'] / 1e6:.1f}M | {p['steps']} | {p['tokens_per_step']:,} | "
                  f"{p['tokens_per_s']:,.0f} | {mem} | {p['loss_first']:.3f} -> {p['loss_last']:.3f} |"]
    return lines


if __name__ == "__main__":
    sys.exit(main())
