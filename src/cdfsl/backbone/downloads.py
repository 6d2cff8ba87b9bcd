"""Before open_clip downloads a pretrained tag: are the weights cached, and can their host be reached?

Offline, open_clip (through huggingface_hub) retries every request and logs each failure twice before giving up,
about a minute later. `check_download` answers in at most a few seconds instead: weights already in the Hugging Face
cache (or open_clip's own URL cache) load as they are; otherwise the host they come from must accept a connection,
or the run stops with what to do (a local checkpoint file, or the cache filled on a machine with internet).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from cdfsl.errors import BackboneError

HF_HOST = "huggingface.co"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PROBE_TIMEOUT_S = 3.0


def cached_weights(pretrained_cfg: dict[str, object]) -> Path | None:
    """The local copy of a tag's weights (`open_clip.get_pretrained_cfg(name, tag)`), or None when not downloaded."""
    hub = str(pretrained_cfg.get("hf_hub") or "").strip("/")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        parts = hub.split("/")  # owner/repo[/subfolder]
        repo_id, folder = "/".join(parts[:2]), "/".join(parts[2:])
        for filename in WEIGHT_FILES:
            found = try_to_load_from_cache(repo_id, f"{folder}/{filename}" if folder else filename)
            if isinstance(found, str):
                return Path(found)
    url = str(pretrained_cfg.get("url") or "")
    if url:
        local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(urlparse(url).path)
        if local.is_file():
            return local
    return None


def reachable(host: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether `host` accepts a TCP connection on port 443 within `timeout` seconds (name resolution included)."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def unreachable_because(host: str) -> str | None:
    """Why nothing can be downloaded from `host` here (`HF_HUB_OFFLINE` set, or no connection within the probe's
    timeout), or None when it can."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    return None if reachable(host) else f"{host} cannot be reached from this machine"


def check_download(name: str, tag: str, pretrained_cfg: dict[str, object]) -> None:
    """Raise `BackboneError` at once when `name`'s weights `tag` are neither cached nor downloadable from here."""
    if cached_weights(pretrained_cfg) is not None:
        return
    hub = str(pretrained_cfg.get("hf_hub") or "")
    host = HF_HOST if hub else urlparse(str(pretrained_cfg.get("url") or "")).hostname
    if host is None:
        return
    why = unreachable_because(host)
    if why is None:
        return
    raise BackboneError(
        f"{name} weights {tag!r} are not in the local cache and {why}. Either download them where there is "
        f"internet (python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{tag}')\"), copy the "
        "Hugging Face cache (~/.cache/huggingface) here and set HF_HUB_OFFLINE=1; or pass a local checkpoint file: "
        "--pretrained PATH"
    )
