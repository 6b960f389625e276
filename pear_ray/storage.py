"""Run folders on object storage: a folder of a run lives at a local path or at a URL (`s3://bucket/prefix`,
`gs://bucket/prefix`), and every process works on a local copy of it.

    location   where the folder lives: a path, or a URL reached through pyarrow.fs
    local      this node's copy: the folder itself for a path; for a URL, <scratch>/<scheme>/<bucket>/<prefix>,
               <scratch> being $PEAR_RAY_SCRATCH (default ~/.cache/pear_ray/scratch)

DeepSpeed, save_pretrained, TensorBoard and Parquet writers want local paths, so everything is written to the local
copy, then published (uploaded); what a resume reads is fetched (downloaded) first. For a local path both do nothing.
The scratch copy is only a cache: what counts is what the bucket holds. An object appears whole or not at all, so a
file is never seen half-uploaded; a set of files (a checkpoint) counts once the caller uploads its marker last.

Credentials and the endpoint come from the standard provider chain (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_ENDPOINT_URL for an S3-compatible store, AWS_REGION / AWS_DEFAULT_REGION, a profile, the
node's role; Google's application default credentials for gs://, or none with STORAGE_EMULATOR_HOST naming an
emulator). None of them is ever part of a message, and a URL that carries credentials is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

SCRATCH_ENV = "PEAR_RAY_SCRATCH"
DEFAULT_SCRATCH = Path("~/.cache/pear_ray/scratch")
SCHEMES = ("s3", "gs", "gcs")
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
GCS_RETRY_SECONDS = 30  # Google's client retries for 15 minutes by default: a preflight would seem to hang
GCS_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"  # Google's clients' variable for a GCS emulator's address
FETCHING = ".fetching"  # suffix of a download in progress (moved into place whole)
UNPUBLISHED_SUFFIXES = (".partial", FETCHING)  # files still being written: atomic.py's, and our downloads
CHUNK = 8 << 20


def is_url(location: str | Path) -> bool:
    """Whether a run folder's location is object storage (a URL of a scheme pyarrow.fs reaches) and not a path."""
    return isinstance(location, str) and urlsplit(location).scheme in SCHEMES


def join(location: str | Path, *parts: str) -> str:
    """A location inside another (`output_dir` and a run's name, an experiment's folder and a cell's)."""
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location, *parts))


def redact(text: str) -> str:
    """`text` with the values of the credential variables of this environment blanked out."""
    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value:
            text = text.replace(value, "***")
    return text


def endpoint() -> str:
    """The S3 endpoint in use, for messages: AWS_ENDPOINT_URL's host (never anything before an @), or AWS's own."""
    given = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not given:
        return "AWS's endpoint (no AWS_ENDPOINT_URL)"
    parts = urlsplit(given)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def scratch_root() -> Path:
    return Path(os.environ.get(SCRATCH_ENV) or DEFAULT_SCRATCH).expanduser()


def describe_failure(error: OSError, scheme: str = "s3") -> str:
    """What the store said, in words a user acts on; the store's own message (redacted) when it is none of those.
    pyarrow gives no error codes, only the SDKs' names for them in the text."""
    text = str(error)
    if any(code in text for code in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
                                     "EXPIRED_TOKEN", "PERMISSION_DENIED", "UNAUTHENTICATED", "OAuth2 access token")):
        where = ("GOOGLE_APPLICATION_CREDENTIALS or the node's service account" if scheme == "gs" else
                 "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or the node's role")
        return f"access refused: check the credentials ({where}) and that they may read and write there"
    if any(code in text for code in ("NETWORK_CONNECTION", "curlCode", "Could not resolve", "UNAVAILABLE")):
        if scheme == "gs":
            return "the store cannot be reached: check the network"
        return f"the store cannot be reached at {endpoint()}: check AWS_ENDPOINT_URL and the network"
    return redact((text.strip().splitlines() or [type(error).__name__])[0])


class StorageError(OSError):
    """Object storage refused or failed an operation: the message names what was done (with the URL) and why."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: {reason}")
        self.what, self.reason = what, reason

    def __reduce__(self):  # raised in an actor, it reaches the driver whole (Ray pickles it)
        return type(self), (self.what, self.reason)


class Remote:
    """The object-storage side of a folder: the bucket-relative path of the folder, and a file system that reaches it
    (made when first used: naming a folder touches no network)."""

    def __init__(self, scheme: str, bucket: str, key: str):
        self.scheme, self.bucket = scheme, bucket
        self.key = key  # the folder's prefix in the bucket, without slashes at the ends ("" for the bucket itself)

    @cached_property
    def filesystem(self):
        """A pyarrow.fs file system for the bucket, configured from the environment (from_uri reads the endpoint,
        region and credentials the way the provider chain does)."""
        from pyarrow import fs

        options = f"?retry_limit_seconds={GCS_RETRY_SECONDS}" if self.scheme == "gs" else ""
        try:
            if self.scheme == "gs" and (emulator := os.environ.get(GCS_EMULATOR_ENV)):
                return _gcs_emulator(emulator)
            return fs.FileSystem.from_uri(f"{self.scheme}://{self.bucket}{options}")[0]
        except OSError as error:
            raise StorageError(self.url(), describe_failure(error, self.scheme)) from None

    def path(self, relative: str = "") -> str:
        """The file system's path of a file or folder under this one (`bucket/prefix/relative`)."""
        return "/".join(part for part in (self.bucket, self.key, relative) if part)

    def url(self, relative: str = "") -> str:
        return f"{self.scheme}://{self.path(relative)}"


def _gcs_emulator(address: str):
    """A GCS file system on an emulator or another GCS-compatible server at `address` (`http://host:port`), without
    credentials, as Google's own clients do when STORAGE_EMULATOR_HOST is set."""
    from datetime import timedelta

    from pyarrow import fs

    parts = urlsplit(address if "://" in address else f"http://{address}")
    return fs.GcsFileSystem(anonymous=True, scheme=parts.scheme, endpoint_override=parts.netloc,
                            retry_time_limit=timedelta(seconds=GCS_RETRY_SECONDS))


def _remote(url: str) -> Remote:
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ValueError(f"run folder {parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}: the URL holds "
                         "credentials; give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or a "
                         "profile, never in output_dir or --run-dir, which are written into the run folder")
    key = parts.path.strip("/")
    if not parts.netloc or any(part in (".", "..") for part in key.split("/")) or parts.query or parts.fragment:
        raise ValueError(f"run folder {url}: give it as {parts.scheme}://bucket/prefix (no '.' or '..' in the "
                         "prefix, no query)")
    return Remote("gs" if parts.scheme == "gcs" else parts.scheme, parts.netloc, key)


class RunFolder:
    """A folder of a run where it lives (`location`) and this node's copy of it (`local`); see the module's notes.

    `skip` names top-level entries that `publish()` leaves to others (a run folder's checkpoints, which the learner
    ranks publish; its state file, which goes last). Publishing uploads what changed since this object last
    published or fetched it; files the bucket holds at the same size and a later time than the local copy's count as
    published already (to the second: S3 lists times in whole seconds).
    """

    def __init__(self, location: str | Path, skip: Iterable[str] = ()):
        self.location = str(location).rstrip("/") if is_url(location) else str(location)
        self.skip = tuple(skip)
        self.remote = _remote(self.location) if is_url(location) else None
        if self.remote is None:
            self.local = Path(location)
            self.root = self.local
        else:
            self.root = scratch_root() / self.remote.scheme / self.remote.bucket  # the bucket's copy on this node
            self.local = self.root / self.remote.key
        self.published: dict[Path, tuple[int, int]] = {}  # local file -> (size, mtime_ns) when it was last in sync

    def __repr__(self) -> str:
        return f"RunFolder({self.location!r})"

    # ------------------------------------------------------------------ where

    def where(self, path: Path) -> str:
        """The location of a local path under this node's copy: the path itself, or its URL."""
        if self.remote is None:
            return str(path)
        return f"{self.remote.scheme}://{self.remote.bucket}/{self._bucket_key(path)}"

    def _bucket_key(self, path: Path) -> str:
        try:
            return Path(path).absolute().relative_to(self.root.absolute()).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not in the local copy {self.root} of {self.remote.scheme}://"
                             f"{self.remote.bucket}") from None

    def _remote_path(self, path: Path) -> str:
        return f"{self.remote.bucket}/{self._bucket_key(path)}"

    def _failure(self, what: str, error: OSError) -> StorageError:
        return StorageError(what, error.reason if isinstance(error, StorageError)
                            else describe_failure(error, self.remote.scheme))

    # ------------------------------------------------------------------ reading where the folder lives

    def problem(self) -> str | None:
        """Why the folder cannot be used (its bucket missing, access refused, the store unreachable, a file where
        the folder should be); None when it can. Reads only; for a local path, None (preflight checks those)."""
        if self.remote is None:
            return None
        from pyarrow import fs

        try:
            info = self.remote.filesystem.get_file_info(self.remote.path())
            if info.type == fs.FileType.File:
                return "a file is in the way (give another output_dir or --run-dir)"
            if info.type == fs.FileType.NotFound and not self._bucket_exists():
                return f"the bucket {self.remote.bucket} does not exist (create it, or check the URL and endpoint)"
        except StorageError as error:
            return error.reason
        except OSError as error:
            return describe_failure(error, self.remote.scheme)
        return None

    def _bucket_exists(self) -> bool:
        """Whether the folder's bucket exists; True when the store does not say (credentials scoped to a prefix may
        not look at the bucket itself, and they answered for the prefix)."""
        from pyarrow import fs

        try:
            return self.remote.filesystem.get_file_info(self.remote.bucket).type != fs.FileType.NotFound
        except OSError:
            return True

    def read_text(self, name: str) -> str | None:
        """A file of the folder, read where the folder lives (the bucket for a URL); None when it is not there."""
        if self.remote is None:
            path = self.local / name
            return path.read_text() if path.is_file() else None
        try:
            with self.remote.filesystem.open_input_stream(self.remote.path(name)) as stream:
                return stream.read().decode()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._failure(f"reading {self.remote.url(name)}", error) from None

    def sizes(self, name: str = "") -> dict[str, int]:
        """Size of every file under `name` (a folder of this one), by its path relative to `name`, where the folder
        lives: what a reader would find."""
        if self.remote is None:
            base = self.local / name
            return {path.relative_to(base).as_posix(): path.stat().st_size for path in sorted(base.rglob("*"))
                    if path.is_file()} if base.is_dir() else {}
        return {relative: info.size for relative, info in self._listing(self.remote.path(name)).items()}

    def _listing(self, prefix: str) -> dict:
        """FileInfo of every object under `prefix` (a file system path), by its path relative to it."""
        from pyarrow import fs

        try:
            infos = self.remote.filesystem.get_file_info(fs.FileSelector(prefix, recursive=True,
                                                                         allow_not_found=True))
        except OSError as error:
            raise self._failure(f"listing {self.remote.scheme}://{prefix}", error) from None
        return {info.path[len(prefix) + 1:]: info for info in infos if info.type == fs.FileType.File}

    # ------------------------------------------------------------------ publishing and fetching

    def publish(self, *paths: Path) -> None:
        """Upload files or folders of the local copy (default: all of it less `skip`) that changed since they were
        last in sync. A no-op for a local folder."""
        if self.remote is None:
            return
        if not paths and self.local.is_dir():
            paths = tuple(entry for entry in sorted(self.local.iterdir()) if entry.name not in self.skip)
        for path in paths:
            for file in _files(Path(path)):
                if self._changed(file):
                    self.upload(file)

    def upload(self, file: Path) -> int:
        """Upload one file of the local copy, whatever its state; returns its size."""
        stat = file.stat()
        target = self._remote_path(file)
        try:
            with open(file, "rb") as source, self.remote.filesystem.open_output_stream(target) as sink:
                shutil.copyfileobj(source, sink, CHUNK)
            stored = self.remote.filesystem.get_file_info(target)
        except OSError as error:
            raise self._failure(f"uploading {file} to {self.remote.scheme}://{target}", error) from None
        # The local copy takes the object's time: a node that later finds it at the bucket's size and time keeps it.
        mtime = stored.mtime_ns or stat.st_mtime_ns
        os.utime(file, ns=(stat.st_atime_ns, mtime))
        self.published[file] = (stat.st_size, mtime)
        log.debug("uploaded %s://%s (%d bytes)", self.remote.scheme, target, stat.st_size)
        return stat.st_size

    def _changed(self, file: Path) -> bool:
        stat = file.stat()
        return self.published.get(file) != (stat.st_size, stat.st_mtime_ns)

    def fetch(self, path: Path, *, refresh: bool = False) -> bool:
        """Download a file or folder of the folder into the local copy, when the bucket has it; files already
        there at the bucket's size and no older than the bucket's are kept unless `refresh` (a copy older than the
        bucket's is another run's, or an earlier export of this one). Returns whether it is there locally now. For a
        local folder, only the latter."""
        path = Path(path)
        if self.remote is not None:
            prefix = self._remote_path(path)
            from pyarrow import fs

            try:
                info = self.remote.filesystem.get_file_info(prefix)
            except OSError as error:
                raise self._failure(f"looking for {self.remote.scheme}://{prefix}", error) from None
            if info.type == fs.FileType.File:
                self._download(prefix, path, info, refresh)
            elif info.type == fs.FileType.Directory:
                for relative, entry in self._listing(prefix).items():
                    self._download(entry.path, path / relative, entry, refresh)
        return path.exists()

    def _download(self, source: str, target: Path, info, refresh: bool) -> None:
        if not refresh and target.is_file() and _same(target.stat(), info):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=FETCHING)
        try:
            with os.fdopen(handle, "wb") as sink, self.remote.filesystem.open_input_stream(source) as stream:
                shutil.copyfileobj(stream, sink, CHUNK)
            if info.mtime_ns:
                os.utime(temporary, ns=(time.time_ns(), info.mtime_ns))  # the object's time: see upload
            os.replace(temporary, target)  # ranks sharing a node may fetch the same file: each moves a whole copy
        except OSError as error:
            Path(temporary).unlink(missing_ok=True)
            raise self._failure(f"downloading {self.remote.scheme}://{source}", error) from None
        stat = target.stat()
        self.published[target] = (stat.st_size, stat.st_mtime_ns)

    def remove(self, name: str) -> None:
        """Delete a file of the folder where it lives and locally (missing is fine)."""
        (self.local / name).unlink(missing_ok=True)
        if self.remote is not None:
            try:
                self.remote.filesystem.delete_file(self.remote.path(name))
            except FileNotFoundError:
                pass
            except OSError as error:
                raise self._failure(f"deleting {self.remote.url(name)}", error) from None

    # ------------------------------------------------------------------ the driver's copy

    def prepare(self, marker: str, refreshed: Iterable[str]) -> None:
        """Ready the local copy for a run: a copy whose `marker` file differs from the bucket's is another run's
        (or an older point of this one) and is dropped; the `refreshed` files and folders, which a resume reads
        first, are fetched anew; the other files already at the bucket's size and no newer than its count as
        published. For a local folder, only creates it."""
        if self.remote is None:
            self.local.mkdir(parents=True, exist_ok=True)
            return
        recorded = self.read_text(marker)
        here = self.local / marker
        if self.local.exists() and (recorded is None or not here.is_file() or here.read_text() != recorded):
            log.info("dropping the scratch copy %s of %s: the bucket holds another state", self.local, self.location)
            shutil.rmtree(self.local)
        self.local.mkdir(parents=True, exist_ok=True)
        for name in (marker, *refreshed):
            self.fetch(self.local / name, refresh=True)
        for relative, info in self._listing(self.remote.path()).items():
            file = self.local / relative
            if file.is_file():
                stat = file.stat()
                if stat.st_size == info.size and stat.st_mtime_ns // 10**9 <= info.mtime_ns // 10**9:
                    self.published[file] = (stat.st_size, stat.st_mtime_ns)

    def move_aside(self) -> str | None:
        """Move the folder to a sibling named with the time (nothing is deleted: for --fresh); returns where, or
        None when there is nothing to move. In a bucket, its objects are copied there and then removed, and the
        local copy, a cache, is dropped."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if self.remote is None:
            if not self.local.exists():
                return None
            aside = self.local.with_name(f"{self.local.name}-{stamp}")
            while aside.exists():
                aside = aside.with_name(aside.name + "-1")
            self.local.rename(aside)
            return str(aside)
        files = self._listing(self.remote.path())
        if not files:
            return None
        aside = f"{self.remote.path()}-{stamp}"
        while self._listing(aside):
            aside += "-1"
        filesystem = self.remote.filesystem
        try:
            for relative in files:
                filesystem.copy_file(self.remote.path(relative), f"{aside}/{relative}")
            for relative in files:
                filesystem.delete_file(self.remote.path(relative))
        except OSError as error:
            raise self._failure(f"moving {self.location} aside", error) from None
        shutil.rmtree(self.local, ignore_errors=True)
        return f"{self.remote.scheme}://{aside}"


def materialize(location: str | Path) -> Path:
    """This node's copy of a file or folder given by its location, for code that may run on any node (an actor, a
    read task): a URL's is fetched into this node's scratch (files already there at the bucket's size and time are
    kept, so it is fetched once per node); a path is its own copy (on a cluster, one every node reaches: a model
    cache, a shared file system)."""
    if not is_url(location):
        return Path(location)
    copy = RunFolder(location)
    try:
        found = copy.fetch(copy.local)
    except StorageError as error:  # the driver reached the store: this node's environment lacks what it needs
        raise StorageError(error.what, f"{error.reason} (on {socket.gethostname()}: every node needs the store's "
                           "endpoint and credentials in its own environment)") from None
    if not found:
        raise FileNotFoundError(f"{copy.location} is not in the bucket")
    return copy.local


def _same(local: os.stat_result, remote) -> bool:
    """Whether a local file is the bucket's: the same size, and not older (uploads and downloads give the local copy
    the object's time; to the second, as S3 lists whole seconds). An older one is another run's."""
    return local.st_size == remote.size and local.st_mtime_ns // 10**9 >= (remote.mtime_ns or 0) // 10**9


def _files(path: Path) -> list[Path]:
    """The complete files of a file or folder (nothing still being written)."""
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = sorted(file for file in path.rglob("*") if file.is_file())
    else:
        return []
    return [file for file in candidates
            if not any(part.endswith(UNPUBLISHED_SUFFIXES) for part in file.relative_to(path.parent).parts)]

