"""The Hugging Face Hub: hub ids, downloads, the conversion cache's paths, uploads.

`cumo_mlx.load("shi-labs/CuMo-mistral-7b")` (and every `--model`) resolves a hub id through
`loader.resolve_model_path`: a repo already in MLX layout (its config.json embeds `vision_config`)
is downloaded and used as is; an original PyTorch checkpoint is downloaded and converted once,
4-bit by default, into a cache directory that later loads reuse:

    $CUMO_MLX_CACHE, else $HF_HOME/cumo-mlx, else ~/.cache/cumo-mlx
        <owner>--<name>-4bit/            (revision-pinned: <owner>--<name>@<revision>-4bit)

Downloads go through huggingface_hub, so HF_HOME, HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE apply.
A download says first how much it fetches and where to, then shows huggingface_hub's progress bars.
Offline (HF_HUB_OFFLINE, or the hub not answering a quick connection attempt), a checkpoint already
in the hub cache is still used; one that is not is a clear CuMoError at once (huggingface_hub
would retry for most of a minute first).
"""

import json
import os
import re
import socket
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from .errors import CheckpointError, ConfigError, CuMoError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEFAULT_BITS = 4
PROBE_TIMEOUT_S = 3  # to connect to the hub before a download
# The tokenizer's files in a model directory: copied along by conversion, training and saving.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
# Besides the weights: what a conversion reads.
META_FILES = [
    "config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    *TOKENIZER_FILES,
    "preprocessor_config.json",
]


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and ".." not in name


def local_directory(name: str, kind: str) -> Optional[Path]:
    """The existing directory the path `name` names, or None when there is none and `name` is a hub id.

    `kind` ("model", "checkpoint") words the errors: `name` is a file, or neither a path nor a hub id.
    """
    path = Path(os.path.expanduser(name))  # (Path.expanduser raises for "~nobody")
    if os.path.exists(path):  # (False for a name too long to be a path, where Path.exists raises)
        if not path.is_dir():
            raise CuMoError(f"{name} is a file, not a {kind} directory", "give the directory holding config.json")
        return path
    if not is_hub_id(name):
        raise CuMoError(
            f"{kind} directory not found: {name}", "check the path, or give a hub id like shi-labs/CuMo-mistral-7b"
        )
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _unreachable() -> Optional[str]:
    """Why the hub cannot be reached (a TCP connection to its endpoint), or None when it can. Behind
    a proxy the direct connection proves nothing: None."""
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    if not url.hostname or urllib.request.getproxies():
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"{constants.ENDPOINT}: {e.strerror or e}"
    return None


def _local_only() -> Optional[str]:
    """Why files must come from the local cache (HF_HUB_OFFLINE, an unreachable hub), or None."""
    return "HF_HUB_OFFLINE is set" if _offline() else _unreachable()


def _hub_error(repo_id: str, revision: Optional[str], error: Exception, local_only: Optional[str] = None) -> CuMoError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return CuMoError(
            f"hub repository {repo_id} is gated", "accept its terms on huggingface.co and log in with `hf auth login`"
        )
    if isinstance(error, RepositoryNotFoundError):
        return CuMoError(
            f"hub repository {repo_id} not found", "check the id; for a private repo log in with `hf auth login`"
        )
    if isinstance(error, RevisionNotFoundError):
        return CuMoError(f"revision '{revision}' not found in hub repository {repo_id}", "check --revision")
    if isinstance(error, HFValidationError):
        return CuMoError(
            f"{repo_id} is not a valid hub id", "give a local directory or a hub id like shi-labs/CuMo-mistral-7b"
        )
    if isinstance(error, LocalEntryNotFoundError) or local_only:
        return CuMoError(
            f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached"
            + (f" ({local_only})" if local_only else ""),
            "connect to the network, or download it first and convert the local copy",
        )
    return CuMoError(
        f"cannot download {repo_id} from the hub: {type(error).__name__}: {error}"[:300],
        "check your network and the hub id",
    )


def _announce(repo_id: str, files: list[str], sizes: dict[str, int]) -> None:
    """Say what a download fetches (from the hub's file sizes) and where it goes, before it starts."""
    from huggingface_hub import constants

    total = sum(sizes.get(name) or 0 for name in files)
    print(f"{repo_id}: downloading {len(files)} files, {total / 1e9:.2f} GB, into {constants.HF_HUB_CACHE} "
          "(files already there are not fetched again)", file=sys.stderr)  # fmt: skip


def _remote_files(repo_id: str, revision: Optional[str]) -> dict[str, int]:
    """The repo's file names and their sizes in bytes."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    return {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or []}


def _snapshot(
    repo_id: str, revision: Optional[str], allow_patterns: Optional[list], progress: bool, local: bool
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if not progress:
        disable_progress_bars()
    try:
        if local:
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
    finally:
        if not progress:
            enable_progress_bars()


def download_checkpoint(
    repo_id: str,
    select_weight_files: Callable[[list, Callable[[str], dict]], list],
    revision: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """The local snapshot of an original checkpoint: config, tokenizer and weights, nothing else.

    select_weight_files(names, read_index) picks the weight files among the repo's file names;
    read_index(name) is the `weight_map` of the index file `name`.
    """
    from huggingface_hub import hf_hub_download

    local_only = _local_only()
    try:
        if local_only:
            return _snapshot(repo_id, revision, None, progress, local=True)
        sizes = _remote_files(repo_id, revision)

        def read_index(name: str) -> dict:
            with open(hf_hub_download(repo_id, name, revision=revision), encoding="utf-8") as f:
                return json.load(f)["weight_map"]

        weights = select_weight_files(list(sizes), read_index)
        if not weights:
            raise CheckpointError(
                f"hub repository {repo_id} holds no weights (*.safetensors or pytorch_model*.bin)", "check the hub id"
            )
        wanted = weights + META_FILES
        _announce(repo_id, [name for name in sizes if name in wanted], sizes)
        return _snapshot(repo_id, revision, wanted, progress, local=False)
    except CuMoError:
        raise
    except Exception as e:
        raise _hub_error(repo_id, revision, e, local_only) from None


def cache_root() -> Path:
    if os.environ.get("CUMO_MLX_CACHE"):
        return Path(os.environ["CUMO_MLX_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "cumo-mlx"
    return Path("~/.cache/cumo-mlx").expanduser()


def converted_path(repo_id: str, revision: Optional[str] = None, bits: int = DEFAULT_BITS) -> Path:
    owner, name = repo_id.split("/")
    pin = f"@{re.sub(r'[^A-Za-z0-9_.-]', '_', revision)}" if revision else ""
    return cache_root() / f"{owner}--{name}{pin}-{bits}bit"


def is_mlx_repo(repo_id: str, revision: Optional[str] = None) -> Optional[bool]:
    """Whether the hub repo is already in MLX layout (None when its config cannot be read)."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=_local_only() is not None)
        with open(path, encoding="utf-8") as f:
            return "vision_config" in json.load(f)
    except Exception:
        return None


def download_model(repo_id: str, revision: Optional[str] = None, progress: bool = True) -> Path:
    """The local snapshot of a whole repo (an MLX model: every file is used)."""
    local_only = _local_only()
    try:
        if not local_only:
            sizes = _remote_files(repo_id, revision)
            _announce(repo_id, list(sizes), sizes)
        return _snapshot(repo_id, revision, None, progress, local=bool(local_only))
    except Exception as e:
        raise _hub_error(repo_id, revision, e, local_only) from None


def download_vision_tower(repo_id: str) -> Path:
    """The local directory of a CLIP vision tower's config.json (and preprocessor_config.json, where
    the repo has one), as `mm_vision_tower` names it in an original config.json."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
    )

    local_only = _local_only()
    try:
        directory = Path(hf_hub_download(repo_id, "config.json", local_files_only=local_only is not None)).parent
    except HFValidationError:
        raise ConfigError(
            f"mm_vision_tower '{repo_id}' is neither a known tower, a local directory nor a hub id",
            "set --vision-tower to a CLIP directory or hub id",
        ) from None
    except Exception as e:  # offline, unknown repo, network failure
        if local_only:
            raise ConfigError(
                f"the vision tower config '{repo_id}' is not in the local hub cache and the hub cannot be reached "
                f"({local_only})",
                "connect to the network, or pass --vision-tower with a local CLIP directory",
            ) from None
        raise ConfigError(
            f"cannot fetch the vision tower config '{repo_id}' from the hub ({type(e).__name__})",
            "connect to the network, or pass --vision-tower with a local CLIP directory",
        ) from None
    try:
        hf_hub_download(repo_id, "preprocessor_config.json", local_files_only=local_only is not None)
    except (EntryNotFoundError, LocalEntryNotFoundError):  # (none in the repo, or none cached while offline)
        pass
    return directory


def upload(path: Path, repo_id: str) -> None:
    """Upload a converted model directory to the hub (creating the repo if needed)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id=repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(path), repo_id=repo_id, repo_type="model")
    except Exception as e:
        raise CuMoError(
            f"upload to {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
            f"the converted model is in {path}; log in with `hf auth login` and retry: hf upload {repo_id} {path}",
        ) from None
    print(f"uploaded to https://huggingface.co/{repo_id}", file=sys.stderr)
