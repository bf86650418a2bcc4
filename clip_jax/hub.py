"""Hugging Face hub names, "hf-hub:ORG/NAME[@REVISION]", resolved to a model directory through
huggingface_hub's local cache (HF_HUB_CACHE / HF_HOME), downloading only the files a model needs,
and nothing where the hub is offline (HF_HUB_OFFLINE=1): then a missing file is an error naming it
and the command that fetches it.
"""

from __future__ import annotations

import os

PREFIX = "hf-hub:"
# The small files that say which layout (and so which weights) a repository holds.
CONFIG_FILES = ("config.json", "open_clip_config.json")


def is_hub_name(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def parse(name: str) -> tuple[str, str | None]:
    """("ORG/NAME", revision or None) of "hf-hub:ORG/NAME[@REVISION]"."""
    repo, _, revision = name[len(PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{name!r} is no hub name: write hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo, revision or None


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants
    except ImportError as e:
        raise ImportError("hf-hub: names are resolved by huggingface_hub: pip install huggingface_hub "
                          "(or pip install clip_jax[hub])") from e
    return huggingface_hub


def fetch_command(repo: str, revision: str | None, files) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo} {' '.join(files)}{rev}"


def _missing(name: str, repo: str, revision: str | None, files, offline: bool, cause=None) -> FileNotFoundError:
    from huggingface_hub import constants

    why = "downloads are off (HF_HUB_OFFLINE=1)" if offline else f"the download failed ({cause})"
    python = (f"huggingface_hub.snapshot_download({repo!r}, allow_patterns={list(files)!r}"
              + (f", revision={revision!r}" if revision else "") + ")")
    return FileNotFoundError(
        f"{name}: {', '.join(files)} of {repo} are not in the hub cache ({constants.HF_HUB_CACHE}) and {why}. "
        f"Fetch them where the hub is reachable with `{fetch_command(repo, revision, files)}` "
        f"(python: {python}), into the same cache (HF_HOME / HF_HUB_CACHE).")


def _snapshot(hub, name, repo, revision, patterns, offline, wanted) -> str:
    """The snapshot folder with the files of `patterns` that the repository has; an error naming the
    `wanted` files where it cannot be had."""
    try:
        return hub.snapshot_download(repo, revision=revision, allow_patterns=list(patterns),
                                     cache_dir=hub.constants.HF_HUB_CACHE, local_files_only=offline)
    except Exception as e:  # offline and uncached, no network, no such repo: each is "not here, fetch it"
        raise _missing(name, repo, revision, wanted, offline, cause=e) from e


def resolve(name: str) -> str:
    """The local directory of a hub name's snapshot holding its config and weights (from the cache;
    downloaded where online and missing). FileNotFoundError naming the missing files and how to fetch
    them; ImportError where huggingface_hub is not installed."""
    from clip_jax import hf_layouts

    repo, revision = parse(name)
    hub = _hub()
    offline = bool(hub.constants.HF_HUB_OFFLINE)  # read at import time from the environment, so read it here
    wanted = (hf_layouts.CONFIG, hf_layouts.WEIGHTS)
    snapshot = _snapshot(hub, name, repo, revision, CONFIG_FILES, offline, wanted)
    if os.path.exists(os.path.join(snapshot, hf_layouts.CONFIG)):
        weights = (hf_layouts.WEIGHTS, hf_layouts.SHARD_INDEX, "model-*-of-*.safetensors")
    elif os.path.exists(os.path.join(snapshot, hf_layouts.OPEN_CLIP_CONFIG)):
        weights, wanted = hf_layouts.OPEN_CLIP_WEIGHTS, (hf_layouts.OPEN_CLIP_CONFIG, hf_layouts.OPEN_CLIP_WEIGHTS[0])
    else:
        raise _missing(name, repo, revision, wanted, offline, cause="no config.json in the repository")
    snapshot = _snapshot(hub, name, repo, revision, weights, offline, wanted)
    try:
        hf_layouts.weight_files(snapshot)
    except FileNotFoundError:
        raise _missing(name, repo, revision, wanted, offline, cause="no weights in the repository") from None
    return snapshot
