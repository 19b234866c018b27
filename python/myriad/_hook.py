"""Zero-code progress for unmodified PyTorch scripts. The agent puts `sitecustomize` (in
`myriad/_site`) on every Python rank's path; it calls `install()`, which

- registers a faulthandler dump of every thread's Python stack on SIGUSR2 into MYRIAD_STACK_FILE,
  which the agent reads when it judges the rank hung (before it kills it), and
- waits for `torch.optim.optimizer` to be imported (without importing torch itself, so a Python
  program that never uses torch pays nothing) and then registers PyTorch's global optimizer step
  post-hook: every `optimizer.step()` reports a step to the agent, which is all its hang detector,
  straggler detector and ETTR need.

A script that calls `myriad.report()` speaks for itself: the hook then stays quiet."""

import faulthandler
import importlib.abc
import os
import signal
import sys
import threading
import time
import weakref

from . import _agent

OPTIMIZER_MODULE = "torch.optim.optimizer"


class Steps:
    """This rank's step count and step clock, shared by the hook, `report` and `checkpoint`."""

    def __init__(self):
        self.step = 0
        self.last_end = None
        self.reported = False  # the script calls myriad.report(): the hook stays quiet
        self.optimizer = None  # a weak reference to the one optimizer whose steps are counted
        self.lock = threading.Lock()

    def restart_at(self, step):
        """A restore put the script at the end of `step`: the next step is timed from now, so the
        controller sees from the first step which one the attempt restored."""
        with self.lock:
            self.step = step
            self.last_end = time.monotonic()

    def end(self, step=None):
        """A step ended now: (its number, its duration in ms or None for the first)."""
        now = time.monotonic()
        with self.lock:
            self.step = self.step + 1 if step is None else step
            ms = None if self.last_end is None else (now - self.last_end) * 1e3
            self.last_end = now
            return self.step, ms


steps = Steps()


def _on_optimizer_step(optimizer, args, kwargs):
    if steps.reported:
        return
    # Several optimizers (a GAN, a model with two parameter groups' optimizers) step once each per
    # training step: count the first one's steps only.
    if steps.optimizer is None or steps.optimizer() is None:
        steps.optimizer = weakref.ref(optimizer)
    elif steps.optimizer() is not optimizer:
        return
    step, ms = steps.end()
    _agent.link().send("step_end", step=step, step_ms=ms)


def register(module):
    """Registers the step hook with an imported `torch.optim.optimizer`."""
    hook = getattr(module, "register_optimizer_step_post_hook", None)
    if hook is not None:
        hook(_on_optimizer_step)


class _WatchOptimizerImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `torch.optim.optimizer` is imported, it wraps the real loader so
    the hook is registered the moment the module has run."""

    def find_spec(self, name, path, target=None):
        if name != OPTIMIZER_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is None:
                continue
            loader = spec.loader
            if loader is None or not hasattr(loader, "exec_module"):
                return spec
            sys.meta_path.remove(self)
            spec.loader = _RegisteringLoader(loader)
            return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        register(module)


_installed = False
# The stack dump's file, open for the process's life (see install).
_stack_out = None


def install():
    """Called by the agent's sitecustomize; does nothing outside an agent or when done before."""
    global _installed, _stack_out
    if _installed or not _agent.link().active:
        return
    _installed = True
    stack_file = os.environ.get("MYRIAD_STACK_FILE")
    if stack_file:
        try:
            # Kept open for the process's life: faulthandler writes to the descriptor from a
            # signal handler, where nothing may be opened.
            fd = os.open(stack_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            _stack_out = os.fdopen(fd, "w")
            faulthandler.register(signal.SIGUSR2, file=_stack_out, all_threads=True)
        except (OSError, ValueError, RuntimeError):
            pass
    module = sys.modules.get(OPTIMIZER_MODULE)
    if module is not None:
        register(module)
    else:
        sys.meta_path.insert(0, _WatchOptimizerImport())

