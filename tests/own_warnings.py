"""Which warnings does fira_dist's own code cause? A ``warnings.showwarning`` hook that names the culprit.

A warning's reported location (its ``stacklevel``) is not enough: torch 2.13 deprecates
``torch.distributed.all_gather_into_tensor`` through a decorator whose warning points at torch's own
``c10d_logger.py`` wrapper, whoever called it, so a ``-W error::FutureWarning:fira_dist`` filter never
matches it. This hook walks the stack instead:

1. drop the warnings machinery (``warnings``, ``typing_extensions``, ``functools``, ``contextlib``,
   importlib's frozen frames) from the innermost end: the innermost frame left is the one that warned;
2. its package (``torch``, ``deepspeed``, ``transformers``, ..., or ``fira_dist``) is the emitter;
3. drop the emitter's own frames (and machinery): the next frame is the code that called the emitter.

The warning is fira_dist's when the emitter is fira_dist, the caller is in fira_dist, or the reported location
is in fira_dist. So a deprecated torch collective that DeepSpeed calls is DeepSpeed's (caller
``deepspeed/comm/torch.py``), the same one that ``fira_dist/comm.py`` calls is ours, and a transformers
warning about an argument we pass is ours too.

Used through environment variables, in every Python process that imports it (the tests put a
``sitecustomize.py`` that imports it on ``PYTHONPATH``, so torchrun's workers get it as well):

- ``FIRA_WARNINGS_LOG=path``: append one JSON line per warning shown (all categories, all sources):
  category, message, reported file:line, emitter, caller, ``ours``.
- ``FIRA_WARNINGS_STRICT=1``: a deprecation warning (DeprecationWarning, PendingDeprecationWarning,
  FutureWarning) that is fira_dist's raises instead of printing, as ``-W error`` would; others print as usual.

Either one also sets the deprecation categories to ``always``, so every occurrence reaches the hook (by default
Python hides a DeprecationWarning unless it is reported in ``__main__``).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

_FIRA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fira_dist") + os.sep
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_MACHINERY = ("warnings", "typing_extensions", "functools", "contextlib", "<frozen")


def package_of(filename: str) -> str:
    """The top-level package (or stdlib module) a source file belongs to: 'torch', 'fira_dist', 'warnings', ..."""
    path = os.path.abspath(filename) if not filename.startswith("<") else filename
    if filename.startswith("<frozen"):
        return "<frozen"
    if path.startswith(_FIRA_DIR) or f"{os.sep}fira_dist{os.sep}" in path:
        return "fira_dist"
    for marker in ("site-packages", "dist-packages"):
        key = f"{os.sep}{marker}{os.sep}"
        if key in path:
            rest = path.split(key, 1)[1]
            head = rest.split(os.sep, 1)[0]
            return head[:-3] if head.endswith(".py") else head
    base = os.path.basename(path)
    return base[:-3] if base.endswith(".py") else base


def _machinery(filename: str) -> bool:
    return package_of(filename).startswith(_MACHINERY)


def culprit(frames: list[traceback.FrameSummary]) -> tuple[str, str]:
    """(emitter, caller) for a stack whose innermost frame is the warning call (or the machinery around it).

    Each is 'package path:line'; the caller is '' when the emitter's frames reach the bottom of the stack."""
    i = len(frames) - 1
    while i >= 0 and _machinery(frames[i].filename):
        i -= 1
    if i < 0:
        return "", ""
    emitter_pkg = package_of(frames[i].filename)
    emitter = f"{emitter_pkg} {frames[i].filename}:{frames[i].lineno}"
    while i >= 0 and (package_of(frames[i].filename) == emitter_pkg or _machinery(frames[i].filename)):
        i -= 1
    if i < 0:
        return emitter, ""
    return emitter, f"{package_of(frames[i].filename)} {frames[i].filename}:{frames[i].lineno}"


def is_ours(emitter: str, caller: str, reported_file: str) -> bool:
    return (emitter.startswith("fira_dist ") or caller.startswith("fira_dist ")
            or package_of(reported_file) == "fira_dist")


def install(log_path: str | None = None, strict: bool = False) -> None:
    """Wrap ``warnings.showwarning`` (see the module docstring)."""
    shown = warnings.showwarning

    def hook(message, category, filename, lineno, file=None, line=None):
        frames = traceback.extract_stack()[:-1]  # without this hook
        emitter, caller = culprit(frames)
        ours = is_ours(emitter, caller, str(filename))
        if log_path:
            rec = {"pid": os.getpid(), "category": category.__name__, "message": str(message)[:500],
                   "reported": f"{filename}:{lineno}", "emitter": emitter, "caller": caller, "ours": ours}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if strict and ours and issubclass(category, DEPRECATIONS):
            raise category(f"{message} [raised by tests/own_warnings.py: fira_dist's own deprecated call; "
                           f"emitter {emitter}, caller {caller or '-'}]")
        return shown(message, category, filename, lineno, file, line)

    warnings.showwarning = hook
    for cat in DEPRECATIONS:
        warnings.simplefilter("always", cat)


def install_from_env() -> None:
    log_path = os.environ.get("FIRA_WARNINGS_LOG") or None
    strict = os.environ.get("FIRA_WARNINGS_STRICT", "") not in ("", "0")
    if log_path or strict:
        install(log_path, strict)


SITECUSTOMIZE = f"""import sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import own_warnings
own_warnings.install_from_env()
"""


def write_sitecustomize(folder: str | os.PathLike) -> str:
    """Write a sitecustomize.py into ``folder`` that installs the hook; put ``folder`` first on PYTHONPATH."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    return str(folder)


if __name__ == "__main__":  # summarize a log: python tests/own_warnings.py LOG
    seen: dict[tuple, int] = {}
    for line in open(sys.argv[1]):
        r = json.loads(line)
        key = (r["ours"], r["category"], r["message"][:120], r["emitter"], r["caller"])
        seen[key] = seen.get(key, 0) + 1
    for (ours, cat, msg, emitter, caller), n in sorted(seen.items(), key=lambda kv: (not kv[0][0], -kv[1])):
        print(f"{'OURS ' if ours else '     '}{n:5d}x {cat}: {msg}\n"
              f"        emitter {emitter}\n        caller  {caller}")
