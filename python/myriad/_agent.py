"""The rank's end of the progress protocol: one JSON object per line on the agent's Unix socket
(MYRIAD_AGENT_SOCKET), the same messages Myriad's own trainer sends (proto::progress in the Rust
tree). Outside an agent (no socket in the environment) every send is a no-op. A send never raises
into the training script: progress is advice, and a lost line costs only a late hang verdict."""

import json
import os
import socket
import threading
import time

# An agent that stops reading must not stall a training step for long.
_SEND_TIMEOUT_S = 0.5
# After a failed send, do not try to reconnect on every step.
_RECONNECT_EVERY_S = 1.0


def _env_int(name, default=None):
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


class Link:
    """A lazily opened, thread-safe connection to the agent's progress socket."""

    def __init__(self):
        self.path = os.environ.get("MYRIAD_AGENT_SOCKET")
        self.job_id = _env_int("MYRIAD_JOB_ID")
        self.attempt = _env_int("MYRIAD_ATTEMPT", 0)
        self.local_rank = _env_int("LOCAL_RANK", 0)
        self._sock = None
        self._failed_at = None
        self._lock = threading.Lock()

    @property
    def active(self):
        return self.path is not None and self.job_id is not None

    def send(self, event, **fields):
        """Sends one message; fields that are None are left out. True when it was written."""
        if not self.active:
            return False
        message = {"job_id": self.job_id, "attempt": self.attempt, "local_rank": self.local_rank, "event": event}
        message.update({k: v for k, v in fields.items() if v is not None})
        line = (json.dumps(message) + "\n").encode()
        with self._lock:
            if self._sock is None:
                if self._failed_at is not None and time.monotonic() - self._failed_at < _RECONNECT_EVERY_S:
                    return False
                try:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(_SEND_TIMEOUT_S)
                    s.connect(self.path)
                    self._sock = s
                except OSError:
                    self._failed_at = time.monotonic()
                    return False
            try:
                self._sock.sendall(line)
                return True
            except OSError:
                self._sock.close()
                self._sock = None
                self._failed_at = time.monotonic()
                return False

    def forget(self):
        """After a fork: the child must not share the parent's connection."""
        self._sock = None
        self._lock = threading.Lock()


_link = None


def link():
    global _link
    if _link is None:
        _link = Link()
    return _link


def _after_fork():
    if _link is not None:
        _link.forget()


os.register_at_fork(after_in_child=_after_fork)
