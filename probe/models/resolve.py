"""Where a model name points: a local folder, or (only for an ``org/name`` that is no path) the hub.

A name that looks like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x/``, or ``models/x`` where
``models`` exists here) is a local folder or an immediate error naming it: it never goes to
the hub. An ``org/name`` of the hub's form loads from the local Hugging Face cache when it is
there; otherwise, unless ``HF_HUB_OFFLINE`` is set, one quick request asks the hub whether it
exists before anything is downloaded, so a typo or a missing network fails at once instead of
after transformers' retries.

>>> kind("models/x/y"), kind("HuggingFaceTB/SmolLM2-135M"), kind("gpt2")
('path', 'hub', 'name')
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from ..errors import ModelLoadError

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"^{_PART}/{_PART}$")
TRUE = {"1", "ON", "YES", "TRUE"}  # the values huggingface_hub reads as true


def kind(name: str) -> str:
    """``"path"`` (a local folder is meant), ``"hub"`` (an ``org/name`` hub id) or ``"name"`` (neither)."""
    first = name.split("/", 1)[0]
    if (name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/") or name.count("/") > 1
            or re.match(r"^[A-Za-z]:", name) or ("/" in name and Path(first).exists())):
        return "path"
    if HUB_ID.match(name) and ".." not in name and "--" not in name:
        return "hub"
    return "path" if "/" in name else "name"


def missing_path_error(name: str) -> ModelLoadError:
    """The error for a local-looking name with nothing there (with the closest sibling, if any)."""
    path = Path(name).expanduser()
    parent = path.parent if path.parent.is_dir() else None
    hint = ""
    if parent is not None:
        close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir() if p.is_dir()], n=1)
        hint = f" (did you mean {parent / close[0]}?)" if close else ""
    return ModelLoadError(f"no model folder at {name!r}: {path.absolute()} does not exist{hint}. Give an "
                          "existing Hugging Face model folder (with config.json), a named model (see "
                          "`headwise models`), or a hub id of the form org/name")


def offline() -> bool:
    return any((os.environ.get(v) or "").upper() in TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment now (as huggingface_hub does at import)."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of ``repo_id`` if its config is in the hub cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache())
    return Path(found).parent if isinstance(found, str) else None


def check_hub(repo_id: str, timeout: float = 10.0) -> None:
    """One request to the hub (no retries): a missing repository or no network is an error now."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(repo_id, timeout=timeout)
    except GatedRepoError:
        return  # it exists; from_pretrained explains how to get access
    except RepositoryNotFoundError:
        raise ModelLoadError(f"there is no hub model {repo_id!r} (nor a local folder of that name): check the "
                             "id, or log in (hf auth login) if it is private") from None
    except HfHubHTTPError:
        return  # the hub answered; let from_pretrained report the details
    except Exception as exc:  # no network, DNS, proxy, timeout
        raise ModelLoadError(f"cannot reach the Hugging Face hub to load {repo_id!r} ({type(exc).__name__}: "
                             f"{exc}). Check the network, or download it once and pass the local folder "
                             "(or set HF_HUB_OFFLINE=1 to use only cached models)") from None


def load_hub(repo_id: str, dtype, **place):
    """``(hf, tokenizer, snapshot folder or None)`` for a hub id: from the cache if there, else downloaded.

    ``place``: ``device_map``/``max_memory``/``offload_folder`` for ``from_pretrained`` (a split model).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    snapshot = cached_snapshot(repo_id)
    attempts = ([True] if snapshot is not None else []) + ([] if offline() else [False])
    if not attempts:
        raise ModelLoadError(f"hub model {repo_id!r} is not in the local Hugging Face cache ({hub_cache()}) "
                             "and HF_HUB_OFFLINE is set: download it once online (or unset HF_HUB_OFFLINE), "
                             "or pass a local model folder")
    error = None
    for local in attempts:
        if not local:
            check_hub(repo_id)
        try:
            kw = {"cache_dir": hub_cache(), "local_files_only": local}
            hf = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, **kw, **place)
            return hf, AutoTokenizer.from_pretrained(repo_id, **kw), cached_snapshot(repo_id)
        except Exception as exc:  # a partial cache falls through to the download
            error = exc
    raise ModelLoadError(f"could not load hub model {repo_id!r} ({type(error).__name__}: {error}). Check the id "
                         "and your network, or download it once and pass the local folder") from error
