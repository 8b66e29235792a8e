"""torchrun with gloo over 2 CPU processes: sharded precompute writes the very store one process
writes; data-parallel training matches one process; a rank killed mid-run fails the job, and
the same command resumes it to the same store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_core.inputs import distributed
from sae_core.inputs.paths import cache_dir
from sae_core.saes.checkpoint import CHECKPOINT
from sae_core.saes.sae import SAE, SAEConfig
from sae_core.saes.train_data import TensorSource
from sae_core.saes.train_loop import fit
from tests.app.server_process import free_port
from tests.dist_train_setup import RECIPES, recipe_config, training_data
from tests.test_precompute import dump
from tests.tiny import TRAIN_TEXT

CTX_LEN = 16
LAYER = 1


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), *args]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(TRAIN_TEXT):
        (folder / f"doc{i}.txt").write_text((text + "\n") * 6)
    return str(folder)


@pytest.fixture(scope="module")
def sae_path(llama, tmp_path_factory):
    """A random TopK SAE on the tiny Llama (k=4 of 48 latents)."""
    gen = torch.Generator().manual_seed(2)
    sae = SAE(SAEConfig(d_in=llama.d_model, d_sae=48, architecture="topk", k=4, model_name="tiny", layer=LAYER))
    sae.W_enc.data = torch.randn(llama.d_model, 48, generator=gen) * 0.3
    sae.W_dec.data = torch.randn(48, llama.d_model, generator=gen)
    folder = tmp_path_factory.mktemp("sae") / "random"
    sae.save(folder)
    return folder


def precompute_args(sae_path, llama_dir, corpus, db: str, **flags) -> list[str]:
    settings = {"--batch-size": 3, "--checkpoint-every": 2, "--top-k": 5, "--per-bin": 3, **flags}
    args = ["-m", "sae_core", "precompute", "--sae", str(sae_path), "--db", db, "--model", str(llama_dir)]
    args += ["--corpus", corpus, "--ctx-len", str(CTX_LEN), "--tokens", "0"]
    return args + [str(part) for flag, value in settings.items() for part in (flag, value)]


@pytest.fixture(scope="module")
def single_process_store(sae_path, llama_dir, corpus, tmp_path_factory) -> dict:
    """Every row one process writes with the settings of ``precompute_args``: a fresh process with
    one thread, as each torchrun rank is, so no state this test process picked up from earlier
    tests can change a float's rounding."""
    db = f"sqlite:///{tmp_path_factory.mktemp('single') / 'single.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAESCOPE_CACHE": str(tmp_path_factory.mktemp("single-cache"))}
    finished = subprocess.run(
        [sys.executable, *precompute_args(sae_path, llama_dir, corpus, db)], capture_output=True, text=True, timeout=300, env=env
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    return dump(db)


def test_sharded_precompute_writes_the_single_process_store(sae_path, llama_dir, corpus, single_process_store, tmp_path):
    sharded = f"sqlite:///{tmp_path / 'sharded.db'}"
    finished = subprocess.run(torchrun(*precompute_args(sae_path, llama_dir, corpus, sharded)), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "from 2 ranks" in finished.stderr
    got = dump(sharded)
    assert got["examples"] and got["token_features"]
    for table, rows in single_process_store.items():
        assert got[table] == rows, table
    assert not list((cache_dir() / "precompute").glob("*rank*")), "ranks left their spill or checkpoint behind"


class Killed(Exception):
    pass


class KilledSource(TensorSource):
    """Dies, as a killed process would, when asked for batch ``batches`` + 1."""

    def __init__(self, data: torch.Tensor, batches: int):
        super().__init__(data)
        self.left = batches

    def token_batches(self, batch_size, *, start=0, stop=None):
        for batch in super().token_batches(batch_size, start=start, stop=stop):
            if self.left == 0:
                raise Killed
            self.left -= 1
            yield batch


def test_data_parallel_training_matches_one_process(tmp_path):
    """topk and relu train from scratch on 2 ranks; batchtopk resumes there from the checkpoint of
    a one-process run killed halfway."""
    x = training_data()
    with pytest.raises(Killed):
        fit(KilledSource(x, batches=13), recipe_config("batchtopk"), tmp_path / "batchtopk", progress=False)
    assert torch.load(tmp_path / "batchtopk" / CHECKPOINT)["step"] == 10
    finished = subprocess.run(torchrun("-m", "tests.dist_train_worker", str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    for rank in (0, 1):  # left running, they abort the process at exit now and then
        assert (tmp_path / f"gloo-threads-rank{rank}.txt").read_text() == "", f"gloo's threads outlived rank {rank}'s session"
    for architecture in RECIPES:
        single = fit(TensorSource(x), recipe_config(architecture), tmp_path / f"single-{architecture}", progress=False)
        sharded = load_file(tmp_path / f"{architecture}.safetensors")
        for name, tensor in single.sae.state_dict().items():
            torch.testing.assert_close(sharded[name], tensor, rtol=1e-5, atol=1e-5, msg=f"{architecture} {name}")
    assert sorted(p.name for p in (tmp_path / "topk").iterdir()) == [CHECKPOINT], "only rank 0 writes"
    assert torch.load(tmp_path / "batchtopk" / CHECKPOINT)["step"] == recipe_config("batchtopk").total_steps


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank, if it is running."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


def checkpointed_batches(rank: int) -> int:
    from safetensors import safe_open

    for path in (cache_dir() / "precompute").glob(f"*rank{rank}of2.ckpt"):
        try:
            with safe_open(path, framework="pt") as fh:
                return int(fh.metadata()["batches_done"])
        except Exception:  # being replaced right now
            return 0
    return 0


def test_killed_rank_fails_the_job_and_the_same_command_resumes(sae_path, llama_dir, corpus, single_process_store, tmp_path):
    db = f"sqlite:///{tmp_path / 'killed.db'}"
    args = precompute_args(sae_path, llama_dir, corpus, db, **{"--checkpoint-every": 1})
    job = subprocess.Popen(torchrun(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while job.poll() is None and time.monotonic() < deadline:
        if checkpointed_batches(1) > 0:
            break  # rank 1 is checkpointing along
        time.sleep(0.01)
    pid = rank_pid(job.pid, 1)
    assert pid is not None, f"the job ended before rank 1 could be killed: {job.communicate()[1][-3000:]}"
    os.kill(pid, signal.SIGKILL)
    stderr = job.communicate(timeout=120)[1]
    assert job.returncode != 0
    assert "SIGKILL" in stderr and "rank: 1" in stderr
    assert dump(db)["saes"][0][1] == "running"

    resumed = subprocess.run(torchrun(*args), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "rank 1: resuming" in resumed.stderr
    assert dump(db) == single_process_store


def test_one_process_world_is_the_identity():
    me = distributed.world()
    assert me == distributed.World(0, 1, 0) and me.is_main
    t = torch.arange(5)
    assert distributed.all_reduce(t, "max") is t and distributed.all_gather(t) is t
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert [p.tolist() for p in distributed.gather_ragged(t)] == [t.tolist()]
    assert [distributed.shard_range(10, distributed.World(r, 3, r)) for r in range(3)] == [range(0, 3), range(3, 6), range(6, 10)]
