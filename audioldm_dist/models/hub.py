"""Every `from_pretrained` of the package goes through `from_pretrained` here, so that offline use is fast and clear.

A local folder loads directly. A hub name is tried from the local cache first (`local_files_only=True`);
only if it is not cached, and `HF_HUB_OFFLINE` is not set, the hub is asked, after a reachability
check of `huggingface_hub.constants.ENDPOINT` with a timeout of a few seconds. A name that is neither
cached nor reachable is one `ValueError` naming the setting, instead of transformers' half minute of
retries and a traceback.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REACHABILITY_TIMEOUT_S = 3.0


def hub_is_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_is_reachable(*, timeout_s: float = REACHABILITY_TIMEOUT_S) -> bool:
    """One HEAD request to the hub endpoint; any HTTP answer counts as reachable."""
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout_s)
    except urllib.error.HTTPError:
        return True  # the server answered
    except (OSError, ValueError):
        return False
    return True


def looks_like_local_path(name: str) -> bool:
    """A name that is meant as a path (exists, absolute, ./ or ../, or more than one slash)."""
    return (Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
            or name.endswith((".pt", ".ckpt", ".bin", ".safetensors")))


def from_pretrained(cls: Any, name: str, *, setting: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(name)` with the offline rules above; `setting` names the config key (for errors)."""
    if not name:
        raise ValueError(f"{setting} is empty: expected a local folder (save_pretrained) or a hub name")
    if looks_like_local_path(name):
        if not Path(name).expanduser().is_dir():
            raise ValueError(f"{setting}={name!r}: no such folder (expected a save_pretrained folder)")
        return _load(cls, str(Path(name).expanduser()), setting=setting, **kwargs)
    try:
        return cls.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass  # not in the cache
    if hub_is_offline() or not hub_is_reachable():
        why = "HF_HUB_OFFLINE is set" if hub_is_offline() else "the hub cannot be reached"
        raise ValueError(f"{setting}={name!r} is a hub name that is not in the local cache and {why}; point "
                         f"{setting} at a local copy (save_pretrained folder)")
    return _load(cls, name, setting=setting, **kwargs)


def _load(cls: Any, name: str, *, setting: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ValueError(f"{setting}={name!r}: cannot load a {cls.__name__} from it ({first_line})") from None
