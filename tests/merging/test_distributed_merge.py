"""`torchrun -m pyops merge` / `run_merge(group=...)`: a merge split between processes.

The checkpoints are test_checkpoint_command's tiny Llama-shaped models (odd shapes, a 1-D bias, a
0-d scalar, an int64 buffer, one model sharded). A merge by two ranks must give every tensor of
the one-process merge bit for bit (DARE and DELLA included: their masks are keyed by seed and
tensor name, never by rank), with a correct index, whatever the shard layout. Ranks that disagree
on the plan, a rank that fails and a rank that is killed must leave nothing at the output and no
temporary directory.

Two kinds of launch: the real `python -m torch.distributed.run --standalone --nproc-per-node 2 -m
pyops merge ...` (started before the first test, checked by the tests, as
test_checkpoint_command does with its subprocesses), and pairs of worker processes that join a
gloo group through a file store and call `run_merge` several times (one torch import for many
merges). Both are CPU-only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyops.__main__ import main as cli_main
from pyops.merging import MergeError, run_merge
from pyops.merging import runner
from pyops.merging import safetensors_io as sio
from pyops.merging.safetensors_io import OutEntry

from .test_checkpoint_command import ckpt  # noqa: F401 (a fixture: the checkpoints)
from .test_checkpoint_command import (FLOATS, _assert_same, _config_text, _dead_pid, _expected, _load_output,
                                      _tree_hashes, _write)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
SHARD = "3KB"  # several shards of one to three tensors each
HOOK = "PYOPS_MERGE_TEST_FAIL_RANK"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != HOOK}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def _leftovers(d: Path) -> list:
    """What a merge into d/out left in d: the output and nothing else (no out.tmp-*, out.old-*)."""
    return sorted(p.name for p in d.iterdir() if p.name.startswith("out"))


def _same_as_one_process(out: Path, one: Path) -> None:
    """Every tensor, its dtype and shape as the one-process merge wrote them; a correct index; the
    other files byte for byte."""
    _assert_same(_load_output(out), _load_output(one))
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    hashes_out, hashes_one = _tree_hashes(out), _tree_hashes(one)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "pyops_merge.yaml"):
        assert hashes_out[f] == hashes_one[f], f


# ------------------------------------------------------------------------------------------------
# torchrun subprocesses (started before the first test so that they overlap the others)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def torchruns(ckpt, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("torchrun")
    cfg = _write(root, _config_text(ckpt, "dare_ties") + "dtype: bfloat16\n", "dare.yaml")
    runs = {"good": {}, "killed1": {HOOK: "1"}, "killed0": {HOOK: "0"}, "raise1": {HOOK: "1:raise"}}
    procs = {}
    for name, hook in runs.items():
        d = root / name
        d.mkdir()
        cmd = TORCHRUN + ["-m", "pyops", "merge", str(cfg), "--out", str(d / "out"), "--shard-size", SHARD,
                          "--dist-timeout", "20"]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=_env(**hook))
    yield {"root": root, "cfg": cfg, "procs": procs}
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _finish(torchruns, name: str) -> tuple:
    out, err = torchruns["procs"][name].communicate(timeout=120)
    return torchruns["procs"][name].returncode, out, err, torchruns["root"] / name


def _merge_errors(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("pyops merge:")]


def test_torchrun_merge_matches_one_process(torchruns, tmp_path):
    one = tmp_path / "one"
    run_merge(torchruns["cfg"], one, shard_size=SHARD, progress=False)
    rc, out, err, d = _finish(torchruns, "good")
    assert rc == 0, err[-3000:]
    assert out.count("merged 6 tensors (dare_ties, cpu)") == 1, out  # rank 0 alone prints the summary
    assert "by 2 processes" in out and "rank 1: " in out
    assert not [line for line in _merge_errors(err) if "error" in line], err
    _same_as_one_process(d / "out", one)
    assert _leftovers(d) == ["out"]


def test_torchrun_rank_that_fails_is_named_by_every_rank(torchruns):
    rc, out, err, d = _finish(torchruns, "raise1")
    assert rc != 0
    lines = _merge_errors(err)
    cause = f"{HOOK}: failure injected on rank 1 after its first tensor"
    assert f"pyops merge: error: rank 1 of 2: {cause}" in lines, err[-3000:]
    # rank 0 says which rank failed and why, unless torchrun stopped it first (it stops every rank
    # once one has exited)
    assert (f"pyops merge: error: rank 0 of 2: rank 1 failed: {cause}" in lines
            or "pyops merge: terminated; nothing was written" in lines), err[-3000:]
    assert _leftovers(d) == []


@pytest.mark.parametrize("killed", [1, 0])
def test_torchrun_killed_rank_leaves_nothing(torchruns, killed):
    """A rank that dies (os._exit after its first tensor): torchrun stops the other one, which
    removes the temporary directory, whether the dead rank made it (rank 0) or not."""
    rc, out, err, d = _finish(torchruns, f"killed{killed}")
    assert rc != 0
    assert "merged" not in out
    assert _leftovers(d) == [], err[-3000:]


# ------------------------------------------------------------------------------------------------
# Worker processes calling run_merge on a gloo group
# ------------------------------------------------------------------------------------------------

WORKER = r"""
import datetime, json, os, sys
import torch.distributed as dist
from pyops.merging import MergeError, run_merge

rank, world, store, jobs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
results = []
for job in jobs:
    os.environ.pop("PYOPS_MERGE_TEST_FAIL_RANK", None)
    if job.get("hook"):
        os.environ["PYOPS_MERGE_TEST_FAIL_RANK"] = job["hook"]
    config = job["configs"][rank] if "configs" in job else job["config"]
    # None: run_merge takes the default group, as under torchrun (whose variables say "distributed")
    group = dist.group.WORLD if job.get("group") else None
    os.environ["WORLD_SIZE"] = str(world)
    try:
        r = run_merge(config, job["out"], progress=False, group=group, shard_size=job["shard_size"],
                      **job.get("kwargs", {}))
        results.append({"ok": True, "shards": r.shards, "ranks": r.ranks, "rank": r.rank, "merged": r.merged,
                        "copied": r.copied, "per_rank": [p["tensors"] for p in r.per_rank]})
    except MergeError as exc:
        results.append({"ok": False, "type": type(exc).__name__, "error": str(exc)})
print("RESULTS " + json.dumps(results), flush=True)
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
# No interpreter finalisation: gloo's worker threads can abort it ("terminate called without an
# active exception", pytorch/pytorch#190489) after the results above are complete.
os._exit(0)
"""


def _workers(tmp_path: Path, jobs: list, world: int = 2) -> list:
    """Runs `jobs` on `world` worker processes; returns (returncode, results or None, stderr) per rank."""
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(world), str(store), json.dumps(jobs)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for r in range(world)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        lines = [line for line in out.splitlines() if line.startswith("RESULTS ")]
        done.append((p.returncode, json.loads(lines[-1][8:]) if lines else None, err))
    return done


METHODS = ["task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "model_stock"]


def test_two_ranks_match_one_process_for_every_method(ckpt, tmp_path):  # noqa: F811
    jobs, ones = [], {}
    for i, method in enumerate(METHODS):
        cfg = _write(tmp_path, _config_text(ckpt, method), f"{method}.yaml")
        jobs.append({"config": str(cfg), "out": str(tmp_path / method / "out"), "shard_size": SHARD,
                     "group": i % 2 == 0})
        ones[method] = tmp_path / method / "one"
        run_merge(cfg, ones[method], shard_size=SHARD, progress=False)
    # a rank that fails (rank 1 raises after its first tensor): both ranks raise, nothing written
    cfg = _write(tmp_path, _config_text(ckpt, "ties"), "fail.yaml")
    jobs.append({"config": str(cfg), "out": str(tmp_path / "fail" / "out"), "shard_size": SHARD, "hook": "1:raise"})
    # ranks that disagree on the configuration: both raise before anything is created
    a = _write(tmp_path, _config_text(ckpt, "ties"), "a.yaml")
    b = _write(tmp_path, _config_text(ckpt, "ties").replace('"weight": 0.6,', '"weight": 0.65,'), "b.yaml")
    assert a.read_text() != b.read_text()
    jobs.append({"configs": [str(a), str(b)], "out": str(tmp_path / "differ" / "out"), "shard_size": SHARD})
    ranks = _workers(tmp_path, jobs)
    for rank, (rc, results, err) in enumerate(ranks):
        assert rc == 0 and results is not None, (f"rank {rank}: exit status {rc}, results "
                                                 f"{'printed' if results is not None else 'missing'}", err[-3000:])

    for i, method in enumerate(METHODS):
        r0, r1 = ranks[0][1][i], ranks[1][1][i]
        assert r0["ok"] and r1["ok"], (method, r0, r1)
        assert r0["ranks"] == r1["ranks"] == 2 and (r0["rank"], r1["rank"]) == (0, 1)
        assert r0["merged"] == r1["merged"] == len(FLOATS)  # the whole merge's report on every rank
        assert sum(r0["per_rank"]) == len(FLOATS) + 1 and min(r0["per_rank"]) > 0
        out = tmp_path / method / "out"
        _same_as_one_process(out, ones[method])
        _assert_same(_load_output(out), _expected(ckpt, method))
        assert _leftovers(tmp_path / method) == ["out"]

    f0, f1 = ranks[0][1][len(METHODS)], ranks[1][1][len(METHODS)]
    cause = f"{HOOK}: failure injected on rank 1 after its first tensor"
    assert (f1["type"], f1["error"]) == ("CheckpointError", f"rank 1 of 2: {cause}")
    assert (f0["type"], f0["error"]) == ("MergeError", f"rank 0 of 2: rank 1 failed: {cause}")
    assert not (tmp_path / "fail").exists()  # not even the parent that rank 0 made

    d0, d1 = ranks[0][1][len(METHODS) + 1], ranks[1][1][len(METHODS) + 1]
    for r, d in enumerate((d0, d1)):
        assert not d["ok"] and d["error"].startswith(f"rank {r} of 2: the ranks disagree on the configuration: "
                                                     f"rank 0 has {a} (sha256 "), d
        assert f"rank 1 has {b} (sha256 " in d["error"] and d["error"].endswith("; nothing was written")
    assert not (tmp_path / "differ").exists()


def test_ranks_disagreeing_on_an_argument_write_nothing(ckpt, tmp_path):  # noqa: F811
    cfg = _write(tmp_path, _config_text(ckpt, "task_arithmetic"))
    jobs = [{"config": str(cfg), "out": str(tmp_path / "x" / "out"), "shard_size": SHARD, "kwargs": {}}]
    store = tmp_path / "store"
    # the same job, but rank 1 asks for another shard size
    procs = []
    for r, size in enumerate((SHARD, "4KB")):
        job = [dict(jobs[0], shard_size=size)]
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(r), "2", str(store), json.dumps(job)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()))
    for r, p in enumerate(procs):
        out, err = p.communicate(timeout=120)
        res = json.loads([line for line in out.splitlines() if line.startswith("RESULTS ")][-1][8:])[0]
        assert not res["ok"] and res["error"] == (
            f"rank {r} of 2: the ranks disagree on the options: rank 0 has shard size 3000 bytes, device cpu, "
            f"backend auto, copy_tokenizer True, overwrite False, rank 1 has shard size 4000 bytes, device cpu, "
            f"backend auto, copy_tokenizer True, overwrite False; nothing was written"), res
    assert not (tmp_path / "x").exists()


def test_killed_rank_makes_the_other_fail_after_the_timeout(ckpt, tmp_path):  # noqa: F811
    """Without torchrun nobody stops the survivor: it waits for the dead rank's next tensor for
    dist_timeout seconds, then fails and removes the temporary directory."""
    cfg = _write(tmp_path, _config_text(ckpt, "ties"))
    job = {"config": str(cfg), "out": str(tmp_path / "out"), "shard_size": SHARD, "hook": "1",
           "kwargs": {"dist_timeout": 2}}
    (rc0, res0, err0), (rc1, res1, err1) = _workers(tmp_path, [job])
    assert rc1 == 1 and res1 is None  # os._exit(1) after its first tensor
    assert rc0 == 0 and res0 is not None, err0[-3000:]
    assert not res0[0]["ok"]
    assert res0[0]["error"] == ("rank 0 of 2: rank 1 has finished no tensor and did not report its status for 2 s "
                                "(--dist-timeout): it was killed or hangs")
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# In one process: the split, the names, the arguments
# ------------------------------------------------------------------------------------------------

def _items(sizes) -> list:
    return [runner._Item(f"t{i}", OutEntry(f"t{i}", "F32", (n,)), {}, 4 * n * 4) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_split_is_contiguous_and_balanced_by_bytes(world):
    # a Llama-like file order: a large embedding, then layers of large and small tensors, a large head
    sizes = [4096] + [256, 1024, 1024, 1024, 4, 4] * 6 + [4096]
    items = _items(sizes)
    owner = runner._split(items, world)
    assert owner == sorted(owner) and owner[0] == 0 and owner[-1] == world - 1  # contiguous, in order
    weight = [it.nbytes_in + it.entry.nbytes for it in items]
    loads = [sum(w for w, o in zip(weight, owner) if o == r) for r in range(world)]
    assert max(loads) - sum(weight) / world <= max(weight)  # off an equal share by less than one tensor
    shards, files, owners = runner._layout(items, world, 3 * 4096 * 4)
    assert [e.name for s in shards for e in s] == [it.name for it in items]  # file order kept
    assert files == sio.shard_names(len(shards)) and owners == sorted(owners)
    for s, o in zip(shards, owners):  # a shard never spans two ranks
        assert {owner[int(e.name[1:])] for e in s} == {o}


def test_split_of_one_rank_is_the_single_process_layout():
    items = _items([100, 3000, 7, 7, 5000, 1])
    shards, files, owners = runner._layout(items, 1, 4 * 4000)
    assert shards == sio.plan_shards([it.entry for it in items], 4 * 4000) and set(owners) == {0}
    assert runner._layout([], 3, 100) == ([[]], ["model.safetensors"], [0])


def test_stale_distributed_tmp_is_removed_only_for_this_host(ckpt, tmp_path, capsys):  # noqa: F811
    """OUT.tmp-<pid>@<host>: removed when <host> is this machine and <pid> is gone; another
    machine's is always left alone (its pid cannot be checked from here)."""
    out = tmp_path / "out"
    pid = _dead_pid()
    here = runner._tmp_name(out, pid, runner._host_tag())
    there = runner._tmp_name(out, pid, "another-host")
    for d in (here, there):
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    cfg = _write(tmp_path, _config_text(ckpt, "ties"))
    assert cli_main(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"pyops merge: removing {here}, left by an earlier merge (process {pid}) that did not finish"]
    assert not here.exists() and there.is_dir()


def test_world_size_without_torchrun_variables_is_one_line_error(ckpt, tmp_path, monkeypatch, capsys):  # noqa: F811
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _write(tmp_path, _config_text(ckpt, "ties"))
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "pyops merge: error: WORLD_SIZE=2 asks for a distributed merge, but RANK, MASTER_ADDR, MASTER_PORT are not "
        "set: start it with torchrun"]
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(MergeError, match="^WORLD_SIZE: expected an integer"):
        run_merge(cfg, tmp_path / "out")
    monkeypatch.setenv("WORLD_SIZE", "2")  # group=False: this rank merges alone
    assert run_merge(cfg, tmp_path / "out", progress=False, group=False).ranks == 1
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1: one process, as without torchrun
    assert run_merge(cfg, tmp_path / "out", progress=False, overwrite=True).ranks == 1
    assert _leftovers(tmp_path) == ["out"]


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "10", True])
def test_dist_timeout_must_be_positive_seconds(ckpt, tmp_path, bad):  # noqa: F811
    with pytest.raises(MergeError, match="^dist_timeout: expected a positive number of seconds"):
        run_merge(_write(tmp_path, _config_text(ckpt, "ties")), tmp_path / "out", dist_timeout=bad)
    assert _leftovers(tmp_path) == []


def test_without_torchrun_the_merge_is_one_process(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """Without torchrun's variables the merge is the single-process one, even in a process whose
    default group is initialised (a rank of a training job merging alone); so is a merge on a
    group of one rank."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = _write(tmp_path, _config_text(ckpt, "ties"))
    assert not torch.distributed.is_initialized()
    report = run_merge(cfg, tmp_path / "out", progress=False)
    assert (report.ranks, report.rank, report.per_rank) == (1, 0, [])
    assert "processes" not in report.summary()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert run_merge(cfg, tmp_path / "out", progress=False, overwrite=True).ranks == 1
        assert run_merge(cfg, tmp_path / "out", progress=False, overwrite=True,
                         group=torch.distributed.group.WORLD).ranks == 1
    finally:
        torch.distributed.destroy_process_group()
    assert _leftovers(tmp_path) == ["out"]
