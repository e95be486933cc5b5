"""DDP and FSDP2 (fully_shard) train LoRA-FA layers to the same result as one process: 2 gloo
processes on the CPU against a single-process reference computed here. Also runs the torchrun
example in examples/ for a few steps."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed"
)

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_worker():
    spec = importlib.util.spec_from_file_location("lorafa_dist_worker", os.path.join(HERE, "dist_worker.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def two_process_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "dist_worker.py"), str(out), port, str(rank)],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(2)
    ]
    failures = []
    for rank, proc in enumerate(procs):
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"rank {rank} of the distributed run timed out")
        if proc.returncode != 0:
            failures.append(f"rank {rank} exited with {proc.returncode}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert not failures, "\n".join(failures)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def single_process_result():
    worker = _load_worker()
    model = worker.build_model()
    b0 = worker.final_b(model)
    losses = worker.train(model)
    return {"losses": losses, "b": worker.final_b(model), "b0": b0}


def _check_same(b, ref, b0):
    assert set(b) == set(ref)
    for name in ref:
        assert not torch.equal(ref[name], b0[name]), f"{name} did not train"
        # fp32 all-reduce order is the only difference
        torch.testing.assert_close(b[name], ref[name], rtol=1e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_match_one(kind, two_process_result, single_process_result):
    ref = single_process_result
    for rank, result in enumerate(two_process_result):
        _check_same(result[f"{kind}_b"], ref["b"], ref["b0"])
    # the global loss (mean of the two local means) is the single-process loss
    local = [r[f"{kind}_losses"] for r in two_process_result]
    for step, expected in enumerate(ref["losses"]):
        assert (local[0][step] + local[1][step]) / 2 == pytest.approx(expected, rel=1e-5)
    if kind == "fsdp":
        assert all(r["fsdp_sharded"] for r in two_process_result)


def test_torchrun_example_runs():
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", os.path.join(ROOT, "examples", "train_ddp.py"), "--steps", "3",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "step 3" in proc.stdout and "trainable" in proc.stdout
