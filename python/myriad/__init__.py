"""Myriad's side of a PyTorch rank.

Unmodified scripts need nothing from here: the agent's sitecustomize reports every
`optimizer.step()` (see `myriad._hook`). Scripts that want more:

    import myriad
    myriad.report(step=step, loss=loss.item(), tokens=tokens, flops_per_token=6 * n_params)
    myriad.checkpoint.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    state = myriad.checkpoint.load()   # None on a fresh start

Outside an agent all of these do nothing (report) or work on no tier (save returns, load gives
None), so the same script runs under plain `python` or torchrun."""

import os

from . import _agent, _hook, checkpoint

__all__ = ["report", "checkpoint", "in_agent"]


def in_agent():
    """True when this process is a rank Myriad's agent launched."""
    return _agent.link().active


def report(step, loss=None, tokens=None, flops_per_token=None, peak_flops=None, phase=None):
    """Reports that step `step` ended, with its loss and `tokens`, the tokens the whole job
    processed in the step (global batch × sequence length), as Myriad's own trainer reports them.

    With `flops_per_token` (model FLOPs per token, DESIGN.md's rule: 6 × parameters + attention)
    and a peak (`peak_flops`, or MYRIAD_PEAK_FLOPS in the job's env: FLOP/s of one rank's device),
    the step's MFU over the job's WORLD_SIZE devices is reported too. Step time is the time since the previous report. Once a script
    reports, the optimizer hook stops counting for it."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"myriad.report: step {step!r} must be a non-negative integer")
    for name, value in (("tokens", tokens), ("flops_per_token", flops_per_token), ("peak_flops", peak_flops)):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"myriad.report: {name} {value!r} must be a non-negative number")
    if loss is not None:
        loss = float(loss)
    _hook.steps.reported = True
    step, step_ms = _hook.steps.end(step)
    mfu = None
    if peak_flops is None and os.environ.get("MYRIAD_PEAK_FLOPS"):
        try:
            peak_flops = float(os.environ["MYRIAD_PEAK_FLOPS"])
        except ValueError:
            raise ValueError(f"MYRIAD_PEAK_FLOPS={os.environ['MYRIAD_PEAK_FLOPS']!r} is not a number") from None
    if step_ms and tokens and flops_per_token and peak_flops:
        world = _agent._env_int("WORLD_SIZE", 1) or 1
        mfu = tokens * flops_per_token / (step_ms / 1e3) / (peak_flops * world)
    _agent.link().send(
        "step_end",
        step=step,
        loss=loss,
        tokens=None if tokens is None else int(tokens),
        step_ms=step_ms,
        mfu=mfu,
        phase=phase,
    )
