"""Object stores on loopback for the tests, each a server started as a subprocess on a free port and stopped after
(only the process the test started): moto's S3 server (the test extra's `moto[server]`) and a GCS emulator (the test
extra's `gcp-storage-emulator`, Google's JSON API).

`env()` is what a process needs to reach a store through the standard variables; the S3 credentials are made up for
the test and easy to search for in everything a run writes (they must never appear there)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

ACCESS_KEY_ID = "AKIAPEARRAYTESTKEY01"
SECRET_ACCESS_KEY = "pear-ray-test-secret-7f3a9c1e5b"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ObjectStore:
    endpoint: str
    scheme = ""  # a run folder's URL scheme on this store

    def env(self, **extra: str) -> dict[str, str]:
        raise NotImplementedError

    def filesystem(self):
        """A pyarrow file system on this store that may create buckets (the tests' own access)."""
        raise NotImplementedError

    def create_bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return name

    def objects(self, prefix: str) -> dict[str, int]:
        """Size of every object under `bucket/prefix`, by its key relative to it."""
        from pyarrow import fs

        infos = self.filesystem().get_file_info(fs.FileSelector(prefix, recursive=True, allow_not_found=True))
        return {info.path[len(prefix) + 1:]: info.size for info in infos if info.type == fs.FileType.File}

    def read(self, path: str) -> bytes:
        with self.filesystem().open_input_stream(path) as stream:
            return stream.read()


class S3Store(ObjectStore):
    scheme = "s3"

    def env(self, **extra: str) -> dict[str, str]:
        """The variables that point the standard provider chain at this store."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                **extra}

    def filesystem(self):
        from pyarrow import fs

        return fs.S3FileSystem(access_key=ACCESS_KEY_ID, secret_key=SECRET_ACCESS_KEY, region="us-east-1",
                               endpoint_override=self.endpoint, allow_bucket_creation=True)


class GcsStore(ObjectStore):
    scheme = "gs"

    def env(self, **extra: str) -> dict[str, str]:
        """The variable Google's clients (and pear_ray) read for an emulator."""
        from pear_ray.storage import GCS_EMULATOR_ENV

        return {GCS_EMULATOR_ENV: self.endpoint, **extra}

    def filesystem(self):
        from pyarrow import fs

        host = self.endpoint.partition("://")[2]
        return fs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=host, project_id="pear-ray-tests")


@contextmanager
def serving(command: list[str], port: int, name: str, env: dict | None = None) -> Iterator[str]:
    """Run a server on 127.0.0.1:`port` until the block ends; yields its http:// address once it listens."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, f"{name} exited at start (is it installed? the test extra has it)"
                assert time.monotonic() < deadline, f"{name} did not start within 30 s"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def moto_server(*, refuse_everyone: bool = False) -> Iterator[S3Store]:
    """A moto S3 server on 127.0.0.1; with `refuse_everyone`, one that checks credentials and knows none."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"} if refuse_everyone else None
    with serving([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, "moto's server",
                 env) as address:
        yield S3Store(address)


@contextmanager
def gcs_emulator() -> Iterator[GcsStore]:
    """A GCS emulator on 127.0.0.1, keeping its objects in memory."""
    port = free_port()
    with serving([sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1", f"--port={port}",
                  "--in-memory"], port, "the GCS emulator") as address:
        yield GcsStore(address)
