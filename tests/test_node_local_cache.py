"""A cache on each node's own disk: ``--harvest.cache_dir`` holding ``{node}``. Two gloo processes
play two nodes of one process each (LOCAL_RANK 0 and a local world of 1 on both, GROUP_RANK 0 and
1, as torchrun sets them on two machines), each node with its own cache folder: each node's first
process writes its folder's manifest, naming the shards its processes harvested; the attribution
sample is gathered from both; the run trains the same SAEs as one process with one cache."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from test_ddp import WORKER, assert_the_same_saes, kill_launched
from test_distill import tiny_args, tiny_setup  # noqa: F401  (fixture)
from test_tokenised_once import FAST

from trainer import distill


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_nodes(*args: str, finished: Path, timeout: float = 300) -> list[str]:
    """Run the worker as rank 0 and rank 1 of two one-process nodes; their stderr. A launch whose
    work finished (``finished`` exists) and that then hangs in gloo's teardown is killed and passes
    (as in test_ddp.accelerate_launch)."""
    launch_id, port = uuid.uuid4().hex, str(free_port())
    pythonpath = os.pathsep.join(filter(None, [str(WORKER.parent.parent), os.environ.get("PYTHONPATH")]))
    common = {
        **os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "DMSAE_TEST_LAUNCH": launch_id, "PYTHONPATH": pythonpath,
        "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
    }  # fmt: skip
    nodes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *args], env={**common, "RANK": str(node), "GROUP_RANK": str(node)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        for node in range(2)
    ]
    deadline, errors = time.monotonic() + timeout, []
    for node in nodes:
        try:
            _, stderr = node.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            kill_launched(f"DMSAE_TEST_LAUNCH={launch_id}")
            _, stderr = node.communicate(timeout=60)
            assert finished.exists(), "the two-node run hung before finishing:\n" + stderr[-5000:]
        else:
            assert node.returncode == 0, stderr[-5000:]
        errors.append(stderr)
    return errors


def test_two_nodes_with_node_local_caches_train_the_same_saes_as_one_process(tiny_setup, tmp_path):
    two, one, caches = tmp_path / "two", tmp_path / "one", tmp_path / "node-disks"
    args = tiny_args(tiny_setup, two, *FAST, "--harvest.cache_dir", str(caches / "node-{node}"))
    launch_two_nodes("distill", *args, finished=two / "SUMMARY.md")
    for kind, shards in (("activations", 8), ("attribution", 1)):  # contexts 256 and 32, 32 a shard
        manifests = [json.loads((caches / f"node-{node}" / kind / "manifest.json").read_text()) for node in range(2)]
        assert all(m["complete"] and m["num_shards"] == shards for m in manifests), kind
        for node, manifest in enumerate(manifests):  # each node holds its process's shards, and only those
            assert manifest["shards"] == list(range(node, shards, 2)), (kind, node)
            held = sorted(int(p.stem.split("_")[1]) for p in (caches / f"node-{node}" / kind).glob("shard_*.safetensors"))
            assert held == manifest["shards"], (kind, node)
    assert not (two / "cache").exists()
    assert distill.main(tiny_args(tiny_setup, one, *FAST)) == 0
    assert_the_same_saes(one, two)
    training = [json.loads((run / "harvest.json").read_text())["training"] for run in (one, two)]
    assert training[0]["positions"] == training[1]["positions"] and training[0]["excluded"] == training[1]["excluded"]  # both nodes counted
