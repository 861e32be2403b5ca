"""Atomic, validated files: write to a temporary file in the same folder, then rename.

Every headwise file is either JSON, a figure, or a safetensors file whose JSON metadata carries
a ``format`` tag, a ``version`` and the sha256 of its payload (the tensors and the metadata);
loading checks all three and reports a corrupt, edited or foreign file as
:class:`~probe.errors.CorruptFileError`. No pickles are ever read. Files get the permissions of
any other file the user creates (``0666`` less the umask), not the ``0600`` of ``mkstemp``.

>>> import tempfile, torch
>>> path = write_tensors(tempfile.mkdtemp() + "/x.safetensors", {"x": torch.ones(2)}, {"format": "demo", "version": 1})
>>> tensors, meta = read_tensors(path, "demo", versions=(1,))
>>> tensors["x"].tolist(), meta["version"]
([1.0, 1.0], 1)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CorruptFileError, InputError

FIGURE_SUFFIXES = (".html", ".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp")


# ----------------------------------------------------------------------------- permissions

def umask() -> int:
    """The process umask, read without changing it (``/proc``; elsewhere the set-and-restore dance)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have: ``0666``/``0777`` less the umask."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())


def publish_tree(folder: str | os.PathLike) -> None:
    """:func:`publish` a folder and everything in it (writers such as safetensors create ``0600``)."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if not p.is_symlink():
            publish(p)
    publish(folder)


def temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A fresh folder in ``parent`` (same file system, for an atomic rename), with normal permissions."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    publish(tmp)
    return tmp


# ----------------------------------------------------------------------------- atomic writes

@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the body succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish(tmp)  # after the body: some writers (safetensors) recreate the file as 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default))


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(
            f"{what} {path} is corrupt ({exc}); delete it and run again to regenerate it") from exc


def write_figure(fig, path: str | os.PathLike, *, include_plotlyjs: str | bool = "directory") -> Path:
    """Write a plotly figure atomically; the suffix picks the format (HTML, or PNG/SVG/PDF/JPEG/WebP).

    HTML with ``include_plotlyjs="directory"`` (the offline default) refers to ``plotly.min.js``
    beside it, written once (atomically too). Images need kaleido; its errors propagate.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FIGURE_SUFFIXES:
        raise InputError(f"cannot write a figure to {path}: use one of {', '.join(FIGURE_SUFFIXES)}")
    if suffix == ".html":
        html = fig.to_html(include_plotlyjs=include_plotlyjs, full_html=True)
        if include_plotlyjs == "directory" and not (path.parent / "plotly.min.js").exists():
            from plotly.offline import get_plotlyjs

            write_text(path.parent / "plotly.min.js", get_plotlyjs())
        return write_text(path, html)
    fmt = "jpeg" if suffix == ".jpg" else suffix[1:]
    return write_bytes(path, fig.to_image(format=fmt))


# ----------------------------------------------------------------------------- tensors + metadata

def payload_sha256(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """sha256 of the metadata (canonical JSON, without its own ``sha256``) and every tensor's bytes."""
    h = hashlib.sha256()
    core = {k: v for k, v in meta.items() if k != "sha256"}
    h.update(json.dumps(core, sort_keys=True, default=_json_default).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Save tensors with JSON metadata (``meta`` must hold ``format`` and ``version``) and a payload sha256."""
    blob = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = json.loads(json.dumps(meta, default=_json_default))  # what a reader will parse back
    meta["sha256"] = payload_sha256(blob, meta)
    with atomic_path(path) as tmp:
        save_file(blob, str(tmp), metadata={"headwise": json.dumps(meta)})
    return Path(path)


def read_tensors(path: str | os.PathLike, fmt: str, versions: tuple[int, ...] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a file written by :func:`write_tensors`: a ``fmt`` file of a known version, unchanged since.

    ``versions``: the format versions the caller reads (``None``: any). Files written before the
    payload sha256 existed (no ``sha256`` key) still load; any other file must match its sha256.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{fmt} file not found: {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("headwise")
        meta = json.loads(raw) if raw else None
    except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as exc:
        raise CorruptFileError(
            f"{path} is not a readable {fmt} file ({exc}); it may be truncated: regenerate it") from exc
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CorruptFileError(f"{path} is not a {fmt} file (format tag: {found!r})")
    if versions is not None and meta.get("version") not in versions:
        raise CorruptFileError(
            f"{path} is a {fmt} file of version {meta.get('version')!r}, but this headwise reads version "
            f"{', '.join(map(str, versions))}: regenerate it with this headwise (or upgrade headwise)")
    stored = meta.pop("sha256", None)
    if stored is not None and stored != payload_sha256(tensors, meta):
        raise CorruptFileError(f"{path} was changed after it was written (its contents do not match the "
                               "sha256 stored in it): regenerate it")
    return tensors, meta


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
