"""Put on a Python rank's path by Myriad's agent (opt out per job with MYRIAD_PYTHON_HOOK=0 in the
job's env): installs Myriad's zero-code progress hook, then runs the sitecustomize this one hides,
if the interpreter has one of its own."""

import os
import sys


def _myriad_boot():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        from myriad import _hook

        _hook.install()
    except Exception as e:  # never stop a training script from starting
        print(f"myriad: progress hook not installed: {e}", file=sys.stderr)
    import importlib.machinery
    import importlib.util

    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_myriad_boot()
del _myriad_boot
