"""Distributed training: shard invariants of the samplers, and real 2-process gloo runs on
the CPU (torchrun) whose weights agree across ranks, whose checkpoint resumes, and whose
resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from qcs.data import TupleSampler
from qcs.distributed import ShardedIndices, ShardedTupleSampler

# --- sampler shards (no processes) ---------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_tuples_use_each_anchor_at_most_once(world):
    labels = torch.arange(103) % 7
    base = TupleSampler(labels, 7, 4, seed=5)
    shards = [ShardedTupleSampler(TupleSampler(labels, 7, 4, seed=5), r, world)
              for r in range(world)]
    for epoch in (1, 2):
        base.set_epoch(epoch)
        for s in shards:
            s.set_epoch(epoch)
        rows = [s.items() for s in shards]
        assert {len(r) for r in rows} == {103 // world}          # equal steps on every rank
        anchors = torch.cat([r[:, 0] for r in rows])
        assert len(set(anchors.tolist())) == len(anchors) == 103 // world * world
        # the shards are exactly the shared draw dealt out round-robin
        full = base.items()[: 103 // world * world]
        torch.testing.assert_close(torch.stack(rows, 1).reshape(-1, 4), full)
        assert all(len(list(iter(s))) == len(s) for s in shards)
    shards[0].set_epoch(1)
    first = shards[0].items()
    shards[0].set_epoch(2)
    assert not torch.equal(first, shards[0].items())             # a new deal each epoch


def test_sharded_indices_cover_the_test_set_once():
    parts = [list(ShardedIndices(11, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))
    assert [len(ShardedIndices(11, r, 3)) for r in range(3)] == [len(p) for p in parts]


# --- real 2-process runs -------------------------------------------------------------------

_SCRIPT = textwrap.dedent('''
    """Train with qcs.training.train under torchrun; save each rank's weights as evaluated."""
    import logging, os, sys
    import torch
    from safetensors.torch import save_file
    import qcs.training.loop as T
    from qcs.config import apply_overrides, load_config

    run_dir, data_root, epochs, resume, capture, sam = sys.argv[1:7]
    seen = {}
    original = T.evaluate

    def evaluate(model, *args, **kwargs):
        seen["state"] = {k: v.detach().clone().contiguous()
                         for k, v in model.state_dict().items()}
        return original(model, *args, **kwargs)

    T.evaluate = evaluate
    handler = logging.StreamHandler(sys.stdout)  # as the CLI does, with the rank shown
    handler.setFormatter(logging.Formatter(f"rank{os.environ['RANK']}: %(message)s"))
    logging.getLogger("qcs").addHandler(handler)
    logging.getLogger("qcs").setLevel(logging.INFO)
    cfg = apply_overrides(load_config("tiny"), [
        "qcs.backbone_depths=[1, 1, 1]", "qcs.backbone_widths=[8, 8, 16]",
        "qcs.backbone_size=32", "qcs.tokens_side=4", "qcs.embed_dim=16",
        "qcs.heads=2", "qcs.vit_depth=1", "qcs.mlp_ratio=2.0", "qcs.backend=reference",
        "data.image_size=32", "data.format=raf-db", f"data.root={data_root}",
        "data.cache_in_memory=true", "optim.lr=3e-3", "train.batch_size=8",
        "train.threads=1", "train.max_steps_per_epoch=3", "train.deterministic=true",
        "train.device=cpu", f"train.epochs={epochs}", f"optim.sam={sam}"])
    if resume == "yes":
        T.train(cfg, run_dir, resume=run_dir, epochs=int(epochs), show_progress=False)
    else:
        T.train(cfg, run_dir, show_progress=False)
    save_file(seen["state"], os.path.join(capture, f"rank{os.environ['RANK']}.safetensors"))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script, run_dir, root, epochs, resume, capture, sam="true"):
    capture.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script),
           str(run_dir), str(root), str(epochs), resume, str(capture), sam]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def _assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.mark.slow
def test_two_process_gloo_run_agrees_across_ranks_and_resumes(tmp_path):
    from qcs.data import SynthParams, generate
    root = generate(tmp_path / "data", SynthParams(seed=0, train_per_class=12,
                                                   test_per_class=3, size=32))
    script = tmp_path / "ddp_train.py"
    script.write_text(_SCRIPT)

    # uninterrupted: 2 epochs
    full = tmp_path / "full"
    proc = _torchrun(script, full, root, 2, "no", tmp_path / "cap_full")
    w0, w1 = _weights(tmp_path / "cap_full/rank0.safetensors"), \
        _weights(tmp_path / "cap_full/rank1.safetensors")
    _assert_same(w0, w1)                          # parameters and BN buffers, bit for bit
    _assert_same(w0, _weights(full / "last.safetensors"))
    log = (full / "train.log").read_text()
    assert log.count("DDP: 2 processes (gloo)") == 1          # rank 0 alone logs
    assert "epoch 2/2" in log and "rank0: epoch 2/2" in proc.stdout
    assert "rank1:" not in proc.stdout                        # other ranks stay quiet
    hist = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert sum(map(sum, hist[-1]["test_confusion"])) == 7 * 3   # every test image once
    assert not [p.name for p in full.iterdir() if ".tmp" in p.name]
    start = w0

    # interrupted after epoch 1, then resumed to epoch 2 under DDP
    part = tmp_path / "part"
    _torchrun(script, part, root, 1, "no", tmp_path / "cap_part")
    assert json.loads((part / "last.json").read_text())["epoch"] == 1
    _torchrun(script, part, root, 2, "yes", tmp_path / "cap_res")
    r0, r1 = _weights(tmp_path / "cap_res/rank0.safetensors"), \
        _weights(tmp_path / "cap_res/rank1.safetensors")
    _assert_same(r0, r1)
    assert json.loads((part / "last.json").read_text())["epoch"] == 2
    assert [json.loads(x)["epoch"] for x in
            (part / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    _assert_same(r0, start, atol=1e-6)            # the resumed run ends where the full one did
    assert any((r0[k] - _weights(tmp_path / "cap_part/rank0.safetensors")[k]).abs().max() > 0
               for k in r0)                        # and epoch 2 did train

    # without SAM the last forward of an epoch updates each rank's BN statistics with its
    # own batch: they must be made equal again before evaluation and saving
    _torchrun(script, tmp_path / "nosam", root, 1, "no", tmp_path / "cap_nosam", "false")
    _assert_same(_weights(tmp_path / "cap_nosam/rank0.safetensors"),
                 _weights(tmp_path / "cap_nosam/rank1.safetensors"))


@pytest.mark.slow
def test_torchrun_qcs_train_cli(tmp_path):
    """The documented command line: ``torchrun --nproc-per-node 2 -m qcs train ...`` with
    no --out: both ranks agree on the time-stamped run directory, rank 0 alone reports."""
    from qcs.data import SynthParams, generate
    root = generate(tmp_path / "data", SynthParams(seed=1, train_per_class=8, test_per_class=2,
                                                   size=32))
    sets = ["qcs.backbone_depths=[1, 1, 1]", "qcs.backbone_widths=[8, 8, 16]",
            "qcs.backbone_size=32", "qcs.tokens_side=4", "qcs.embed_dim=16",
            "qcs.heads=2", "qcs.vit_depth=1", "data.image_size=32", "train.threads=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "qcs",
           "train", "--data", "raf-db", "--data-root", str(root), "--epochs", "1",
           "--max-steps", "2", "--batch-size", "4", "--device", "cpu"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs                                   # one directory for both
    assert (runs[0] / "last.safetensors").is_file()
    assert proc.stdout.count("test accuracy:") == 1                # printed by rank 0 only
    assert proc.stderr.count("run directory:") == 1                # logs: stderr, rank 0
