"""Resolving Hugging Face Hub ids (models, datasets) to local snapshot folders, fast and with one clear error."""

from __future__ import annotations

from pathlib import Path

from pear_ray.messages import first_line

# The one question asked of the Hub before downloading (does this repo and revision exist?) waits at most this
# long and is not retried, so an unknown or unreachable name fails in seconds.
HUB_TIMEOUT_S = 10.0


class SourceNotFound(ValueError):
    """A name that is neither a local folder nor a Hub id that can be resolved; says what was tried."""


def hub_snapshot(repo_id: str, *, what: str, revision: str | None = None, repo_type: str | None = None,
                 download: bool = True) -> Path | None:
    """The local snapshot folder of a Hub repo. Resolved on the driver and handed on as a path, so every node must
    see the same folder: on a cluster, point HF_HOME (or HF_HUB_CACHE) at shared storage.

    The cache is tried first, so a cached id needs no network. With HF_HUB_OFFLINE=1 that is all; otherwise the Hub
    is asked once, within HUB_TIMEOUT_S, whether the repo and revision exist, and only then is it downloaded (by
    revision name, so the cache's refs/ let a later offline run find it). `what` opens the error message (the config
    key and value). With `download=False` (a check before a run), an id the Hub confirms but the cache lacks gives
    None instead of its files.
    """
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    what += f" (revision {revision!r})" if revision else ""
    tried = [f"no folder {Path(repo_id).expanduser().resolve()}"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type, local_files_only=True))
    except HFValidationError:
        raise SourceNotFound(f"{what}: no such folder, and not a Hub id ('org/name')") from None
    except Exception as error:  # noqa: BLE001 - every failure here means "not in the cache"
        tried.append(f"not in the Hub cache {constants.HF_HUB_CACHE} ({type(error).__name__})")
    if constants.HF_HUB_OFFLINE:
        tried.append("HF_HUB_OFFLINE=1, so no download")
    else:
        try:
            HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type, timeout=HUB_TIMEOUT_S)
            if not download:
                return None
            return Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type,
                                          etag_timeout=HUB_TIMEOUT_S))
        except Exception as error:  # noqa: BLE001 - the message below names the cause
            tried.append(f"the Hub at {constants.ENDPOINT} ({type(error).__name__}: {first_line(error)})")
    raise SourceNotFound(f"{what}: not found; tried: " + "; ".join(tried))
