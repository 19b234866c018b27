"""In-memory checkpoints for PyTorch scripts, in the layout Myriad's own trainer writes (DESIGN.md):
a directory `step_NNNNNNNN` in the node's memory tier (MYRIAD_MEMORY_CHECKPOINT_DIR, tmpfs) holding
safetensors files and `manifest.json` with the SHA-256 of every file, assembled under a hidden
name and renamed into place. The agent then copies it to a buddy node and persists every n-th one,
exactly as it does for `myriad train`; on a restart it hands every node a verified copy of the step
the controller chose (MYRIAD_RESTORE_DIR), which `load()` verifies again and reads.

    myriad.checkpoint.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                  "rng": torch.get_rng_state(), "cursor": cursor})
    restored = myriad.checkpoint.load()    # None on a fresh start
    if restored:
        model.load_state_dict(restored.state["model"]); start = restored.step

A state is nested dicts, lists and tuples whose leaves are tensors, numbers, strings, bytes,
booleans or None; anything else is refused with the path of the leaf. `save` copies the tensors
(the hand-off, on the training thread) and writes them on a background thread, with at most one
write in flight: the next `save` waits for the previous one. In data-parallel training every rank
holds the same state, so only global rank 0 writes; the other ranks' `save` checks the state and
returns. A failed write (a full tmpfs, say) leaves the previous checkpoints as they were and is
raised, naming the directory and the cause, by the next `save` or `wait`."""

import atexit
import base64
import ctypes
import hashlib
import json
import os
import shutil
import threading
import time
from typing import Any, NamedTuple, Optional

from . import _agent, _hook

FORMAT = "myriad-python-1"
MANIFEST = "manifest.json"
STRUCTURE = "state.json"
# The newest and the one before, in case the newest turns out corrupt (the agent's own rule).
KEEP_IN_MEMORY = 2
_CHUNK = 1 << 24


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or a restore would not be the state that was saved."""


class Restored(NamedTuple):
    step: int
    state: Any
    path: str


def _step_dir_name(step):
    return f"step_{step:08d}"


# safetensors' dtype codes; every tensor is stored little-endian, as the CPU holds it.
def _dtypes():
    import torch

    table = {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }
    for name, code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
        if hasattr(torch, name):
            table[getattr(torch, name)] = code
    return table


def _valid_file_stem(name):
    return (
        isinstance(name, str)
        and 0 < len(name) <= 200
        and not name.startswith(".")
        and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
        and name not in ("state", "manifest")
    )


class _Flattener:
    """Splits a state into a JSON structure and named tensors, grouped into files by top-level key."""

    def __init__(self):
        import torch

        self.torch = torch
        self.dtypes = _dtypes()
        self.files = {}  # file name -> [(tensor name, tensor)]
        self.names = set()

    def tensor(self, t, path, file):
        if t.dtype not in self.dtypes:
            raise TypeError(f"myriad.checkpoint: {path}: tensors of dtype {t.dtype} cannot be saved")
        if t.is_sparse or t.layout != self.torch.strided:
            raise TypeError(f"myriad.checkpoint: {path}: only dense tensors can be saved, not {t.layout}")
        name = path
        n = 1
        while name in self.names:
            n += 1
            name = f"{path}#{n}"
        self.names.add(name)
        self.files.setdefault(file, []).append((name, t))
        return {"__tensor__": name, "file": file}

    def walk(self, value, path, file):
        if isinstance(value, self.torch.Tensor):
            return self.tensor(value, path, file)
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return {"__float__": repr(value)}  # exact, and NaN and infinities survive JSON
        if isinstance(value, bytes):
            return {"__bytes__": base64.b64encode(value).decode()}
        if isinstance(value, tuple):
            return {"__tuple__": [self.walk(v, f"{path}[{i}]", file) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.walk(v, f"{path}[{i}]", file) for i, v in enumerate(value)]
        if isinstance(value, dict):
            items = []
            for k, v in value.items():
                if not (k is None or isinstance(k, (str, int, float, bool))):
                    raise TypeError(f"myriad.checkpoint: {path}: a key of type {type(k).__name__} cannot be saved")
                child = f"{path}.{k}" if path else str(k)
                items.append([self.walk(k, child, file), self.walk(v, child, file)])
            return {"__dict__": items}
        raise TypeError(
            f"myriad.checkpoint: {path or 'the state'}: a {type(value).__module__}.{type(value).__qualname__} "
            "cannot be saved (tensors, numbers, strings, bytes, booleans, None, and dicts, lists and tuples of them)"
        )

    def flatten(self, state):
        if isinstance(state, dict):
            items = []
            for k, v in state.items():
                file = f"{k}.safetensors" if _valid_file_stem(k) else "state.safetensors"
                items.append([self.walk(k, str(k), file), self.walk(v, str(k), file)])
            return {"__dict__": items}
        return self.walk(state, "", "state.safetensors")


def _rebuild(node, tensors):
    if isinstance(node, list):
        return [_rebuild(v, tensors) for v in node]
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__float__" in node:
            return float(node["__float__"])
        if "__bytes__" in node:
            return base64.b64decode(node["__bytes__"])
        if "__tuple__" in node:
            return tuple(_rebuild(v, tensors) for v in node["__tuple__"])
        if "__dict__" in node:
            return {_rebuild(k, tensors): _rebuild(v, tensors) for k, v in node["__dict__"]}
        raise CheckpointError(f"unknown node in the state structure: {sorted(node)}")
    return node


def _bytes_of(t):
    """A zero-copy view of a contiguous CPU tensor's bytes."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _write_safetensors(path, tensors, dtypes):
    # Widest elements first: every tensor then starts aligned to its element size.
    tensors = sorted(tensors, key=lambda nt: -nt[1].element_size())
    header, offset = {}, 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    digest = hashlib.sha256()
    size = 0
    with open(path, "xb") as f:
        for chunk in (len(head).to_bytes(8, "little"), head):
            f.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        for _, t in tensors:
            view = _bytes_of(t)
            for start in range(0, len(view), _CHUNK):
                part = view[start : start + _CHUNK]
                f.write(part)
                digest.update(part)
            size += len(view)
    return {"name": os.path.basename(path), "bytes": size, "sha256": digest.hexdigest()}


def _read_verified(path, entry):
    """The file's bytes, or CheckpointError when its size or SHA-256 differs from the manifest."""
    try:
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {entry['bytes']}")
        buf = bytearray(size)
        with open(path, "rb") as f:
            if f.readinto(buf) != size:
                raise CheckpointError(f"{path}: shorter than its size")
    except OSError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if hashlib.sha256(buf).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 differs from the manifest (a corrupt copy)")
    return buf


def _read_safetensors(path, buf, map_location):
    import torch

    codes = {code: dtype for dtype, code in _dtypes().items()}
    n = int.from_bytes(buf[:8], "little")
    header = json.loads(bytes(buf[8 : 8 + n]))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = codes.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unknown dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = info["shape"]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + begin).reshape(shape)
        out[name] = t if map_location in (None, "cpu") else t.to(map_location)
    return out


def _manifest_digest(manifest):
    return hashlib.sha256(json.dumps(manifest, separators=(",", ":")).encode()).hexdigest()


class _Writer:
    def __init__(self):
        self.thread = None
        self.error = None
        self.lock = threading.Lock()

    def wait(self):
        t = self.thread
        if t is not None:
            t.join()
            self.thread = None
        err, self.error = self.error, None
        if err is not None:
            raise err


_writer = _Writer()


def _finish_at_exit():
    # A script's last save completes before the interpreter goes (the thread is a daemon).
    try:
        _writer.wait()
    except CheckpointError as e:
        import sys

        print(f"myriad: {e}", file=sys.stderr)


atexit.register(_finish_at_exit)


def _global_rank():
    return _agent._env_int("RANK", 0)


def memory_dir():
    """This job's memory tier on this node, or None outside an agent."""
    return os.environ.get("MYRIAD_MEMORY_CHECKPOINT_DIR") or None


def save(step, state, blocking=False):
    """Hands `state` at the end of step `step` to the node's memory tier; returns once the tensors
    are copied (or, with `blocking`, once the checkpoint is complete). Raises TypeError for a state
    that cannot be saved and CheckpointError for the previous save's failed write."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"myriad.checkpoint.save: step {step!r} must be a non-negative integer")
    flat = _Flattener()
    structure = flat.flatten(state)  # every rank checks the state: a bad one fails everywhere alike
    _writer.wait()  # at most one write in flight; raises the previous one's error
    root = memory_dir()
    if root is None or _global_rank() != 0:
        return
    # The hand-off: a private copy of every tensor (from the GPU, if there), so training may go on.
    files = {
        name: [(tname, t.detach().to("cpu", copy=True).contiguous()) for tname, t in tensors]
        for name, tensors in flat.files.items()
    }
    args = (root, step, structure, files, flat.dtypes)
    _writer.thread = threading.Thread(target=_write, args=args, name="myriad-checkpoint", daemon=True)
    _writer.thread.start()
    if blocking:
        _writer.wait()


def wait():
    """Waits for the write in flight, if any; raises CheckpointError if it failed."""
    _writer.wait()


def _write(root, step, structure, files, dtypes):
    tmp = os.path.join(root, f".{_step_dir_name(step)}.tmp")
    final = os.path.join(root, _step_dir_name(step))
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, mode=0o700)
        entries = [_write_safetensors(os.path.join(tmp, name), tensors, dtypes) for name, tensors in files.items()]
        body = json.dumps(structure, separators=(",", ":")).encode()
        with open(os.path.join(tmp, STRUCTURE), "xb") as f:
            f.write(body)
        entries.append({"name": STRUCTURE, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()})
        manifest = {
            "format": FORMAT,
            "step": step,
            "world_size": _agent._env_int("WORLD_SIZE", 1),
            "job_id": _agent._env_int("MYRIAD_JOB_ID"),
            "attempt": _agent._env_int("MYRIAD_ATTEMPT", 0),
            "saved_unix_ms": int(time.time() * 1e3),
            "files": entries,
        }
        text = json.dumps({"manifest": manifest, "manifest_sha256": _manifest_digest(manifest)}, indent=1)
        with open(os.path.join(tmp, MANIFEST), "x") as f:
            f.write(text)
        if os.path.exists(final):
            old = os.path.join(root, f".{_step_dir_name(step)}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _writer.error = CheckpointError(f"saving step {step} to {final}: {e}")
        return
    _prune(root, KEEP_IN_MEMORY)
    _agent.link().send("checkpoint", step=step)


def _complete_steps(root):
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    steps = []
    for name in names:
        if name.startswith("step_") and name[5:].isdigit() and os.path.isfile(os.path.join(root, name, MANIFEST)):
            steps.append(int(name[5:]))
    return sorted(steps)


def _prune(root, keep):
    for step in _complete_steps(root)[:-keep]:
        shutil.rmtree(os.path.join(root, _step_dir_name(step)), ignore_errors=True)


def read(path, expected_step=None, map_location="cpu"):
    """Reads and verifies the checkpoint directory `path`: its manifest's digest and format, its
    job (this job's, or none), its step, and every file's size and SHA-256."""
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath, "rb") as f:
            outer = json.loads(f.read())
        manifest = outer["manifest"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: not a readable manifest: {e}") from None
    if _manifest_digest(manifest) != outer.get("manifest_sha256"):
        raise CheckpointError(f"{mpath}: its contents do not match manifest_sha256 (a corrupt copy)")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
    step = manifest["step"]
    if expected_step is not None and step != expected_step:
        raise CheckpointError(f"{mpath}: holds step {step}, the controller chose {expected_step}")
    job = _agent._env_int("MYRIAD_JOB_ID")
    if manifest.get("job_id") is not None and job is not None and manifest["job_id"] != job:
        raise CheckpointError(f"{mpath}: belongs to job {manifest['job_id']}, not job {job}")
    tensors, structure = {}, None
    for entry in manifest["files"]:
        name = entry["name"]
        if os.sep in name or name.startswith("."):
            raise CheckpointError(f"{mpath}: lists an invalid file name {name!r}")
        buf = _read_verified(os.path.join(path, name), entry)
        if name == STRUCTURE:
            structure = json.loads(bytes(buf))
        else:
            tensors.update(_read_safetensors(os.path.join(path, name), buf, map_location))
    if structure is None:
        raise CheckpointError(f"{mpath}: lists no {STRUCTURE}")
    try:
        state = _rebuild(structure, tensors)
    except KeyError as e:
        raise CheckpointError(f"{path}: the structure names tensor {e} that no file holds") from None
    return Restored(step, state, path)


def load(map_location="cpu") -> Optional[Restored]:
    """On a restarted attempt, the state of the step the controller chose, verified, with its step;
    None on a fresh start (the agent named no restore). A restore that does not verify raises
    CheckpointError: the rank exits, and the controller restarts from an older copy."""
    path = os.environ.get("MYRIAD_RESTORE_DIR")
    if not path:
        return None
    expected = _agent._env_int("MYRIAD_RESTORE_STEP")
    restored = read(path, expected, map_location)
    _hook.steps.restart_at(restored.step)
    return restored
