"""The Python package on its own (no agent): checkpoints round-trip bit for bit, bad states and
corrupt or foreign copies are refused with the reason, a full tmpfs fails the next save and
keeps the previous checkpoints, and the progress link speaks the agent's protocol."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

try:
    import torch
except ImportError:  # CI installs torch and sets MYRIAD_REQUIRE_TORCH=1: this skips nowhere there
    if os.environ.get("MYRIAD_REQUIRE_TORCH") == "1":
        raise
    torch = None

import myriad
from myriad import checkpoint

ENV = ("MYRIAD_MEMORY_CHECKPOINT_DIR", "MYRIAD_RESTORE_DIR", "MYRIAD_RESTORE_STEP", "MYRIAD_JOB_ID", "RANK",
       "MYRIAD_AGENT_SOCKET", "MYRIAD_ATTEMPT", "LOCAL_RANK")


@unittest.skipIf(torch is None, "torch is not installed")
class CheckpointTest(unittest.TestCase):
    def setUp(self):
        self.saved_env = {k: os.environ.get(k) for k in ENV}
        self.root = tempfile.mkdtemp(prefix="myriad-py-ckpt-")
        os.environ.update({"MYRIAD_MEMORY_CHECKPOINT_DIR": self.root, "MYRIAD_JOB_ID": "7", "RANK": "0"})
        for k in ("MYRIAD_RESTORE_DIR", "MYRIAD_RESTORE_STEP", "MYRIAD_AGENT_SOCKET"):
            os.environ.pop(k, None)

    def tearDown(self):
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(self.root, ignore_errors=True)

    def state(self):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        return {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": torch.get_rng_state(),
            "cursor": {"epoch": 1, "offset": 4096, "seen": (1, 2.5, None), "lr": float("nan"), "tag": b"\x00x"},
            "half": torch.arange(5, dtype=torch.float16),
            "empty": torch.zeros(0, 3),
        }

    def restore(self, step):
        os.environ["MYRIAD_RESTORE_DIR"] = os.path.join(self.root, f"step_{step:08d}")
        os.environ["MYRIAD_RESTORE_STEP"] = str(step)
        return checkpoint.load()

    def test_a_saved_state_comes_back_bit_for_bit(self):
        self.assertIsNone(checkpoint.load(), "a fresh start restores nothing")
        state = self.state()
        checkpoint.save(3, state, blocking=True)
        r = self.restore(3)
        self.assertEqual(r.step, 3)
        for k, v in state["model"].items():
            self.assertTrue(torch.equal(v, r.state["model"][k]), k)
        self.assertEqual(r.state["optimizer"]["param_groups"], state["optimizer"]["param_groups"])
        for i, s in state["optimizer"]["state"].items():
            for k, v in s.items():
                self.assertTrue(torch.equal(v, r.state["optimizer"]["state"][i][k]), (i, k))
        self.assertTrue(torch.equal(r.state["rng"], state["rng"]))
        c = r.state["cursor"]
        self.assertEqual((c["epoch"], c["offset"], c["seen"], c["tag"]), (1, 4096, (1, 2.5, None), b"\x00x"))
        self.assertTrue(c["lr"] != c["lr"], "NaN survives")
        self.assertEqual(r.state["half"].dtype, torch.float16)
        self.assertEqual(tuple(r.state["empty"].shape), (0, 3))
        names = sorted(os.listdir(r.path))
        self.assertIn("model.safetensors", names)
        self.assertIn("optimizer.safetensors", names)
        # The loaded weights drive a model as before.
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 3))
        model.load_state_dict(r.state["model"])

    def test_at_most_two_copies_are_kept_and_a_rewrite_replaces_the_step(self):
        state = self.state()
        for step in (1, 2, 3, 3):
            checkpoint.save(step, state)
        checkpoint.wait()
        self.assertEqual(sorted(os.listdir(self.root)), ["step_00000002", "step_00000003"])

    def test_a_state_that_cannot_be_saved_is_refused_naming_the_leaf(self):
        with self.assertRaises(TypeError) as e:
            checkpoint.save(1, {"model": {"w": torch.ones(2)}, "cursor": {"sampler": object()}})
        self.assertIn("cursor.sampler", str(e.exception))
        self.assertEqual(os.listdir(self.root), [], "nothing written")
        with self.assertRaises(ValueError):
            checkpoint.save(-1, {})

    def test_a_corrupt_or_foreign_copy_is_never_restored(self):
        checkpoint.save(5, self.state(), blocking=True)
        path = os.path.join(self.root, "step_00000005", "model.safetensors")
        with open(path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 1]))
        with self.assertRaises(checkpoint.CheckpointError) as e:
            self.restore(5)
        self.assertIn("model.safetensors", str(e.exception))
        checkpoint.save(6, self.state(), blocking=True)
        os.environ["MYRIAD_JOB_ID"] = "8"
        with self.assertRaises(checkpoint.CheckpointError) as e:
            self.restore(6)
        self.assertIn("belongs to job 7, not job 8", str(e.exception))
        os.environ["MYRIAD_JOB_ID"] = "7"
        with self.assertRaises(checkpoint.CheckpointError) as e:
            os.environ["MYRIAD_RESTORE_DIR"] = os.path.join(self.root, "step_00000006")
            os.environ["MYRIAD_RESTORE_STEP"] = "5"
            checkpoint.load()
        self.assertIn("the controller chose 5", str(e.exception))

    def test_a_full_tmpfs_fails_the_next_save_and_keeps_the_previous_copy(self):
        if os.geteuid() != 0:
            if os.environ.get("MYRIAD_REQUIRE_TORCH") == "1":
                self.fail("mounting a tmpfs needs root")
            self.skipTest("mounting a tmpfs needs root")
        mount = tempfile.mkdtemp(prefix="myriad-py-full-")
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mount], check=True)
        try:
            os.environ["MYRIAD_MEMORY_CHECKPOINT_DIR"] = mount
            checkpoint.save(1, {"w": torch.ones(1000)}, blocking=True)
            checkpoint.save(2, {"w": torch.ones(100_000)})  # 400 kB: does not fit
            with self.assertRaises(checkpoint.CheckpointError) as e:
                checkpoint.wait()
            self.assertIn("No space left on device", str(e.exception))
            self.assertIn("step_00000002", str(e.exception))
            self.assertEqual(sorted(os.listdir(mount)), ["step_00000001"], "no partial copy left behind")
            os.environ["MYRIAD_RESTORE_DIR"] = os.path.join(mount, "step_00000001")
            os.environ["MYRIAD_RESTORE_STEP"] = "1"
            self.assertTrue(torch.equal(checkpoint.load().state["w"], torch.ones(1000)))
        finally:
            subprocess.run(["umount", mount], check=True)
            os.rmdir(mount)

    def test_other_ranks_check_the_state_but_write_nothing(self):
        os.environ["RANK"] = "1"
        checkpoint.save(1, self.state(), blocking=True)
        self.assertEqual(os.listdir(self.root), [])


class ProgressTest(unittest.TestCase):
    def test_report_speaks_the_agents_protocol_and_outside_an_agent_does_nothing(self):
        saved = {k: os.environ.get(k) for k in ENV}
        d = tempfile.mkdtemp(prefix="myriad-py-sock-")
        path = os.path.join(d, "agent.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        server.settimeout(10)
        lines = []

        def serve():
            conn, _ = server.accept()
            conn.settimeout(10)
            data = b""
            while data.count(b"\n") < 2:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            lines.extend(data.splitlines())
            conn.close()

        t = threading.Thread(target=serve)
        t.start()
        try:
            from myriad import _agent

            os.environ.update({"MYRIAD_AGENT_SOCKET": path, "MYRIAD_JOB_ID": "3", "MYRIAD_ATTEMPT": "1",
                               "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
            _agent._link = None
            myriad.report(step=10, loss=2.5, tokens=1000)
            myriad.report(step=11, loss=2.25, tokens=1000, flops_per_token=1e6, peak_flops=1e9)
            t.join(10)
            first, second = (json.loads(line) for line in lines)
            self.assertEqual((first["job_id"], first["attempt"], first["local_rank"]), (3, 1, 1))
            self.assertEqual((first["event"], first["step"], first["loss"]), ("step_end", 10, 2.5))
            self.assertNotIn("mfu", first, "no step time yet, no MFU")
            self.assertEqual(second["step"], 11)
            expected = 1000 * 1e6 / (second["step_ms"] / 1e3) / (1e9 * 2)
            self.assertAlmostEqual(second["mfu"], expected)
            with self.assertRaises(ValueError):
                myriad.report(step=-3)
            os.environ.pop("MYRIAD_AGENT_SOCKET")
            _agent._link = None
            self.assertFalse(myriad.in_agent())
            myriad.report(step=12)  # outside an agent: nothing, no error
        finally:
            server.close()
            shutil.rmtree(d, ignore_errors=True)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


if __name__ == "__main__":
    unittest.main()
