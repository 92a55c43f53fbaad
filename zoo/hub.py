"""Files from the Hugging Face hub, downloaded on first use into the normal HF cache.

Base models (`zoo.loading.resolve_model`) and reward weights (`rewards.weights.check_reward`)
both come through `snapshot`: the cached snapshot when it holds every file the code loads,
else a download of only those files (`HubFiles.patterns`) at a pinned revision, with
huggingface_hub's progress bars. Offline (`HF_HUB_OFFLINE=1`, which `--offline` sets) or
when the hub cannot be reached, `HubUnreachable` says why, so that the caller refuses
with the one command that fetches the files; nothing is loaded before that.

`HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_HUB_CACHE` and `HF_HOME` are read at each call, not
when huggingface_hub is imported, so that a flag or a test that sets them later counts.
Imports no torch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

UNPINNED = "main"
"""The revision of the hub repos stepzoo names: the branch head. Each should be pinned
to a commit hash (40 hex digits) checked on the hub, which no machine of this project
can reach; a hash also saves the revision lookup of each first download."""


@dataclass(frozen=True)
class HubFiles:
    """The files of a hub repo that the code loads."""

    repo: str
    revision: str
    patterns: tuple[str, ...]
    """File names or fnmatch patterns (`tokenizer/*`), the `allow_patterns` of the download."""

    def command(self) -> str:
        """The `hf download` command that fetches exactly these files into the cache."""
        include = " ".join(f'"{pattern}"' for pattern in self.patterns)
        return f"hf download {self.repo} --revision {self.revision} --include {include}"


class HubUnreachable(Exception):
    """Nothing could be downloaded (offline mode, or no answer from the hub); the message is the reason."""


class DownloadFailed(RuntimeError):
    """A download started and broke off; rerunning finishes it."""


def offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids downloads, as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> Path:
    """The hub cache: HF_HUB_CACHE, else HF_HOME/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def _snapshot_download(files: HubFiles, *, local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            files.repo,
            revision=files.revision,
            allow_patterns=list(files.patterns),
            cache_dir=cache_dir(),
            endpoint=endpoint(),
            local_files_only=local_files_only,
        )
    )


def cached(files: HubFiles) -> Path | None:
    """The cached snapshot folder of `files.revision`, or None; makes no request."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return _snapshot_download(files, local_files_only=True)
    except LocalEntryNotFoundError:
        return None


def download(files: HubFiles) -> Path:
    """Download the files not yet cached; returns the snapshot folder. Raises HubUnreachable
    when offline or when the hub does not answer (nothing was downloaded), DownloadFailed
    when the hub refused the repo or a download broke off."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if offline():
        raise HubUnreachable("HF_HUB_OFFLINE=1 (or --offline) forbids downloading")
    # Asked first and apart, so that "no network" (refused like offline) is never mistaken
    # for a download that broke off (reported as such, to be rerun).
    try:
        HfApi(endpoint=endpoint()).repo_info(files.repo, revision=files.revision)
    except (httpx2.TransportError, ConnectionError) as error:
        raise HubUnreachable(f"the hub at {endpoint()} cannot be reached ({type(error).__name__}: {error})") from None
    except HfHubHTTPError as error:
        raise _failed(files, error) from None
    print(f"Downloading {files.repo} ({files.revision}) into {cache_dir()}", file=sys.stderr)
    try:
        return _snapshot_download(files, local_files_only=False)
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as error:
        raise _failed(files, error) from None


def _failed(files: HubFiles, error: Exception) -> DownloadFailed:
    summary = str(error).splitlines()[0] if str(error) else "no message"
    return DownloadFailed(
        f"downloading {files.repo} (revision {files.revision}) from {endpoint()} failed: "
        f"{type(error).__name__}: {summary}\n"
        f"Rerun the same command to finish it (files already complete stay in {cache_dir()}); a gated or "
        f"private repo needs `hf auth login` first; by hand: `{files.command()}`."
    )


def snapshot(files: HubFiles, is_complete: Callable[[Path], bool]) -> Path:
    """The snapshot folder holding `files`: the cache's when `is_complete` accepts it, else
    one downloaded now. Raises HubUnreachable or DownloadFailed (see `download`)."""
    folder = cached(files)
    if folder is not None and is_complete(folder):
        return folder
    return download(files)
