"""The store on object storage (storage/objects.py) against a real S3 server (SeaweedFS on
127.0.0.1): artifacts shared between "machines" (stores with separate caches), locks that hold
between them, commits that a crash leaves incomplete rather than wrong, and a whole `ember run`
killed with SIGKILL mid-training, run again and verified."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.storage import objects
from ember.storage.objects import ObjectStore, is_url, open_store
from ember.storage.store import MANIFEST, LockTimeout, Store
from ember.tasks.stage import Stage, run_stage
from object_server import free_ports
from pipeline_configs import write_config

pytestmark = pytest.mark.slow


def _write(cfg, ctx):
    (ctx.out / "shards").mkdir()
    (ctx.out / "shards" / "part-0.txt").write_text("the first shard\n")
    (ctx.out / "notes.txt").write_text("notes\n")
    return {"files": 2}


def _count(cfg, ctx):
    text = (ctx.inputs["download"] / "shards" / "part-0.txt").read_text()
    (ctx.out / "count.txt").write_text(str(len(text)))
    return {"chars": len(text)}


def _fail(cfg, ctx):
    (ctx.out / "half.txt").write_text("half")
    raise RuntimeError("the stage died")


DOWNLOAD, COUNT = Stage("download", 1, _write), Stage("normalize", 1, _count, inputs=("download",))


def machine(url: str, tmp_path: Path, name: str) -> ObjectStore:
    """A store as one machine sees it: the shared URL, a cache of its own."""
    return ObjectStore(url, cache=tmp_path / name)


def test_locations(tmp_path):
    assert is_url("s3://bucket/ember") and is_url("gs://b/x") and not is_url("/data/ember")
    assert not is_url("file:///data/ember") and type(open_store(tmp_path)) is Store
    assert open_store(f"file://{tmp_path}").root == tmp_path


def test_an_artifact_made_on_one_machine_is_a_cache_hit_on_another(s3, tmp_path):
    url = f"s3://ember/{tmp_path.name}"
    one, two = machine(url, tmp_path, "one"), machine(url, tmp_path, "two")
    made = run_stage(one, DOWNLOAD, None, {})
    assert not made.cached
    # Every file is in the bucket, the manifest too.
    listed = sorted(p.rsplit("/", 1)[1] for p in one.fs.find(f"ember/{tmp_path.name}/artifacts"))
    assert listed == [MANIFEST, "notes.txt", "part-0.txt"]

    again = run_stage(two, DOWNLOAD, None, {})
    assert again.cached and again.ref == made.ref
    assert not (tmp_path / "two" / "artifacts").exists()  # a hit fetches nothing
    counted = run_stage(two, COUNT, None, {"download": made.ref})
    # The input was fetched into machine two's cache, checked against its manifest.
    fetched = two.path(made.ref) / "shards" / "part-0.txt"
    assert fetched.read_text() == "the first shard\n" and counted.metrics == {"chars": 16}
    assert [a.ref for a in one.ls()] == [made.ref, counted.ref] and one.verify() == []
    assert run_stage(one, COUNT, None, {"download": made.ref}).cached


def test_a_lock_holds_across_machines_and_a_dead_writers_lock_is_broken(s3, tmp_path, monkeypatch):
    url = f"s3://ember/{tmp_path.name}"
    one, two = machine(url, tmp_path, "one"), machine(url, tmp_path, "two")
    ref = "train/" + "a" * 64
    with one.lock(ref):
        with pytest.raises(LockTimeout, match="being written by another run"):
            with two.lock(ref, timeout_s=1):
                pass
    with two.lock(ref, timeout_s=1):  # released
        pass
    lock = f"ember/{tmp_path.name}/locks/train-{'a' * 64}.lock"
    # A writer on another machine that died: its lock stays until nobody has renewed it for STALE_S.
    one.fs.pipe_file(lock, json.dumps({"owner": "elsewhere:1:x", "time": 0}).encode())
    with pytest.raises(LockTimeout):
        with two.lock(ref, timeout_s=1):
            pass
    monkeypatch.setattr(objects, "STALE_S", 1.0)
    with two.lock(ref, timeout_s=10):
        pass
    # A writer of this machine that is gone (a killed run): no need to wait.
    monkeypatch.setattr(objects, "STALE_S", 3600.0)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = f"{os.uname().nodename}:{dead.stdout.strip()}:y"
    one.fs.pipe_file(lock, json.dumps({"owner": owner, "time": time.time()}).encode())
    with two.lock(ref, timeout_s=5):
        pass


def test_a_crash_leaves_nothing_that_looks_complete(s3, tmp_path, monkeypatch):
    url = f"s3://ember/{tmp_path.name}"
    one = machine(url, tmp_path, "one")
    with pytest.raises(RuntimeError, match="the stage died"):
        run_stage(one, Stage("download", 1, _fail), None, {})
    assert one.ls() == [] and one.verify() == []

    # Killed between the files and the manifest: the files are there, the artifact is not.
    real_put = one.fs.put_file

    def die_at_manifest(local, remote, **kwargs):
        if remote.endswith(MANIFEST):
            raise KeyboardInterrupt("killed")
        return real_put(local, remote, **kwargs)

    monkeypatch.setattr(one.fs, "put_file", die_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        run_stage(one, DOWNLOAD, None, {})
    monkeypatch.setattr(one.fs, "put_file", real_put)
    two = machine(url, tmp_path, "two")
    assert two.ls() == [] and two.verify() == [
        f"artifacts/download/{run_ref_key(two)}: incomplete (no manifest); gc removes it"
    ]
    assert two.gc() == [f"artifacts/download/{run_ref_key(two)}"] and two.verify() == []
    assert not run_stage(two, DOWNLOAD, None, {}).cached and two.verify() == []


def run_ref_key(store: ObjectStore) -> str:
    (folder,) = store.fs.ls(f"{store.remote}/artifacts/download")
    return folder.rsplit("/", 1)[1]


def test_ember_run_on_s3_killed_mid_training_resumes_and_verifies(s3, tmp_path):
    """The whole pipeline with `store.root: s3://...`; SIGKILL while training; run again; verify."""
    url = f"s3://ember/{tmp_path.name}"
    config = write_config(
        tmp_path, store={"root": url}, train={"max_steps": 60, "checkpoint_every": 10, "eval_every": 30}
    )
    env = {
        **os.environ,
        **s3.env,
        "EMBER_CACHE": str(tmp_path / "cache"),
        "COLUMNS": "200",
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    ember = [sys.executable, "-m", "ember.flows.cli"]
    log = tmp_path / "first.log"
    first = subprocess.Popen(
        [*ember, "run", str(config)],
        env=env,
        cwd=tmp_path,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    store = ObjectStore(url, cache=tmp_path / "reader")
    checkpoints = tmp_path / "cache"
    deadline = time.monotonic() + 300
    # Kill it once training has a complete checkpoint (in the machine's cache: work/train/...):
    # LATEST names one only after its folder is renamed into place, where `ckpt-*` would also
    # match the `ckpt-N.tmp` being written, and a kill then leaves nothing to resume from.
    while not list(checkpoints.glob("*/work/train/*/LATEST")):
        assert first.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert store.ls("train") == [] and store.fs.glob(f"ember/{tmp_path.name}/locks/train-*.lock")

    second = subprocess.run(
        [*ember, "run", str(config)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    (train,) = store.ls("train")
    assert train.metrics["resumed_from"] >= 10 and train.metrics["steps"] == 60
    assert not store.fs.glob(f"ember/{tmp_path.name}/locks/*.lock")  # every lock released
    verify = subprocess.run(
        [*ember, "verify", "--store", url], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert verify.returncode == 0 and "10 artifacts verified in s3://ember/" in verify.stdout, (
        verify.stdout + verify.stderr
    )

    # The release is in the bucket too: another machine (another cache) lists it and can serve it.
    assert store.fs.cat_file(f"ember/{tmp_path.name}/releases/LATEST") == b"v0001"
    elsewhere = {**env, "EMBER_CACHE": str(tmp_path / "elsewhere")}
    listed = subprocess.run(
        [*ember, "releases", "--store", url], env=elsewhere, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert listed.returncode == 0 and "v0001" in listed.stdout and "← latest" in listed.stdout, listed.stdout
    (cache,) = (tmp_path / "elsewhere").iterdir()
    assert (cache / "releases" / "latest" / "model.safetensors").is_file()


def _copy_folder(source: Path, cfg, ctx):
    shutil.copytree(source, ctx.out, dirs_exist_ok=True)
    return {}


@pytest.mark.usefixtures("one_torch_thread")
def test_torchrun_on_two_nodes_reads_the_store_and_trains_like_one_process(s3, tmp_path):
    """torchrun --nnodes 2 (gloo) on two "machines" (folders of their own, the bucket shared):
    each fetches the token shards into its cache, and the losses are one process's."""
    from ember.tasks import train
    from test_train_stages import context, make_artifacts, tiny_train

    url = f"s3://ember/{tmp_path.name}"
    store = machine(url, tmp_path, "uploader")
    artifacts = make_artifacts(tmp_path / "artifacts", chars=60_000)
    refs = {
        name: run_stage(store, Stage(name, 1, functools.partial(_copy_folder, folder)), None, {}).ref
        for name, folder in artifacts.items()
    }
    cfg = tiny_train(
        batch_size=5,
        tokens_per_step=10 * 64,
        max_steps=4,
        log_every=1,
        eval_every=2,
        eval_batches=2,
        checkpoint_every=2,
    )
    single = train.run(cfg, context(tmp_path, "one", artifacts))
    config = tmp_path / "train.json"
    config.write_text(cfg.model_dump_json())

    port = free_ports(1)[0]
    nodes = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        env = {**os.environ, **s3.env, "EMBER_CACHE": str(node / "cache"), "OMP_NUM_THREADS": "1"}
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={rank}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "ember.tasks.train.ddp",
            "--config",
            str(config),
            "--store",
            url,
            *[f"--input={name}={ref}" for name, ref in refs.items()],
            "--out",
            str(node / "out"),
            "--work",
            str(node / "work"),
        ]
        nodes.append(
            (
                node,
                subprocess.Popen(
                    command,
                    env=env,
                    cwd=node,
                    stdout=(node / "log").open("wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                ),
            )
        )
    for node, proc in nodes:
        assert proc.wait(timeout=300) == 0, (node / "log").read_text()[-3000:]

    first, second = (node for node, _ in nodes)
    a = [json.loads(line) for line in (tmp_path / "one-out" / "loss.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (first / "out" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    assert single["steps"] == 4 and (first / "out" / "model.safetensors").is_file()
    assert list((second / "out").iterdir()) == []  # rank 0 alone writes the model
    for node in (first, second):  # each machine fetched the shards it read into its own cache
        (cache,) = (node / "cache").iterdir()
        assert (cache / "artifacts" / refs["tokenize"] / "meta.json").is_file()
