"""Where a model's layers live: one device, or split by accelerate over GPUs, the CPU and the disk.

A :class:`Placement` is what the user asks for (``device_map="auto" | "balanced" | "sequential" |
{module: device}``, ``max_memory={device: size}``, ``offload_folder``). Models read from a folder or
the hub are placed by ``from_pretrained`` (weights stream straight to their device, so a model larger
than the host's memory loads); models built in memory (the tiny test models) are placed by
:func:`dispatch`. Either way accelerate's hooks move each block's inputs to where its weights are and
page disk-offloaded weights in for the block's forward, so the engine's attention function sees
tensors that all sit on the layer's own device.

:func:`input_device` is where inputs go (the first non-offloaded execution device, as accelerate's
``dispatch_model`` picks it); :func:`named_state` reads every weight, offloaded ones one module at a
time, so the weights hash of a split model equals the single-device one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import InputError, ModelLoadError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_GPU = re.compile(r"^(?:cuda:)?(\d+)$")


@dataclass(frozen=True)
class Placement:
    """A requested split (see the module docstring); ``None`` fields: accelerate's defaults."""

    device_map: str | dict | None = None
    max_memory: dict | None = None
    offload_folder: str | None = None

    def __post_init__(self):
        if self.device_map is None:
            if self.max_memory or self.offload_folder:
                raise InputError("max_memory and offload_folder split a model: give device_map too "
                                 "(e.g. device_map='auto')")
            return
        _need_accelerate()
        dm = self.device_map
        if isinstance(dm, str) and dm not in STRATEGIES:
            raise InputError(f"unknown device_map {dm!r}: use one of {', '.join(STRATEGIES)} or a dict "
                             "{module name: device} (devices: 0, 'cuda:1', 'cpu', 'disk')")
        if isinstance(dm, dict):
            object.__setattr__(self, "device_map", {str(k): _device(v, "device_map") for k, v in dm.items()})
            if not dm:
                raise InputError("device_map is an empty dict: name at least one module and its device")
        elif not isinstance(dm, str):
            raise InputError(f"device_map must be a strategy name or a dict, not {type(dm).__name__}")
        if self.max_memory is not None:
            object.__setattr__(self, "max_memory", _max_memory(self.max_memory))
        if self.offload_folder is not None:
            object.__setattr__(self, "offload_folder", str(Path(self.offload_folder).expanduser()))
        if isinstance(self.device_map, dict) and "disk" in self.device_map.values() and not self.offload_folder:
            raise InputError("the device_map sends modules to 'disk': give offload_folder (--offload-folder DIR)")

    def fresh(self) -> "Placement":
        """This placement with its own new folder under ``offload_folder`` (removed with the model, see
        :func:`own_folder`): accelerate reuses any ``index.json`` it finds, so a shared folder could page in
        another model's weights."""
        if self.offload_folder is None:
            return self
        import dataclasses
        import tempfile

        Path(self.offload_folder).mkdir(parents=True, exist_ok=True)
        return dataclasses.replace(self, offload_folder=tempfile.mkdtemp(prefix="headwise-offload-", dir=self.offload_folder))

    @property
    def split(self) -> bool:
        return self.device_map is not None

    def from_pretrained_kwargs(self) -> dict:
        """What ``from_pretrained`` takes for this placement (nothing when not split)."""
        if not self.split:
            return {}
        kw = {"device_map": self.device_map}
        if self.max_memory is not None:
            kw["max_memory"] = self.max_memory
        if self.offload_folder is not None:
            kw["offload_folder"] = self.offload_folder
        return kw

    def uses_gpu(self) -> bool:
        if isinstance(self.device_map, dict):
            return any(isinstance(v, int) for v in self.device_map.values())
        if self.max_memory is not None:
            return any(isinstance(k, int) for k in self.max_memory)
        return torch.cuda.is_available()


def _need_accelerate() -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ModelLoadError("splitting a model over devices needs accelerate: pip install accelerate") from None


def _device(value, what: str):
    """0, 'cuda:0' -> 0; 'cpu', 'disk', 'mps' as they are; anything else is refused."""
    if isinstance(value, bool):
        raise InputError(f"{what}: {value!r} is not a device")
    if isinstance(value, int):
        return value
    if isinstance(value, torch.device):
        value = str(value)
    text = str(value).strip().lower()
    if text == "cuda":
        return 0
    m = _GPU.match(text)
    if m:
        return int(m.group(1))
    if text in ("cpu", "disk", "mps"):
        return text
    raise InputError(f"{what}: unknown device {value!r}: use a GPU index (0, 'cuda:1'), 'cpu' or 'disk'")


def _max_memory(mm) -> dict:
    from accelerate.utils import convert_file_size_to_int

    if not isinstance(mm, dict) or not mm:
        raise InputError("max_memory must be a dict {device: size}, e.g. {0: '20GiB', 'cpu': '64GiB'}")
    out = {}
    for k, v in mm.items():
        dev = _device(k, "max_memory")
        try:
            size = int(v) if isinstance(v, int) else convert_file_size_to_int(str(v))
        except ValueError:
            raise InputError(f"max_memory[{k!r}] = {v!r} is not a size: write bytes or '10GiB', '500MB'") from None
        if size <= 0:
            raise InputError(f"max_memory[{k!r}] must be positive, got {v!r}")
        out[dev] = size
    return out


def parse_device_map(text: str | None):
    """A CLI value: a strategy name, inline JSON, or a JSON file ``{module: device}``."""
    if text is None or text in STRATEGIES:
        return text
    path = Path(text).expanduser()
    raw = path.read_text() if path.is_file() else text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(f"--device-map {text!r}: use {', '.join(STRATEGIES)}, a JSON object "
                         "'{\"model.layers.0\": 0, ...}' or a JSON file holding one") from None
    if not isinstance(value, dict):
        raise InputError(f"--device-map {text!r}: the JSON must be an object {{module: device}}")
    return value


def parse_max_memory(text: str | None) -> dict | None:
    """``"0=20GiB,cpu=64GiB"`` -> ``{0: "20GiB", "cpu": "64GiB"}`` (sizes checked by :class:`Placement`)."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        dev, sep, size = part.partition("=")
        if not sep or not dev.strip() or not size.strip():
            raise InputError(f"--max-memory {text!r}: write DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=64GiB")
        out[dev.strip()] = size.strip()
    return out


def dispatch(hf: torch.nn.Module, placement: Placement, dtype: torch.dtype) -> torch.nn.Module:
    """Place an in-memory model as ``placement`` says (accelerate's ``infer_auto_device_map`` + ``dispatch_model``)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    hf = hf.to(dtype)
    dm = placement.device_map
    no_split = list(getattr(hf, "_no_split_modules", None) or [])
    if isinstance(dm, str):
        memory = placement.max_memory
        if dm in ("auto", "balanced", "balanced_low_0") and memory is None and torch.cuda.device_count() > 1:
            memory = get_balanced_memory(hf, no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=dm == "balanced_low_0")
        dm = infer_auto_device_map(hf, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    else:
        _check_covers(hf, dm)
    if set(dm.values()) == {"disk"}:
        raise InputError("max_memory leaves no room for any module on a device (all on disk): raise the cpu or "
                         "GPU limit so that at least the embeddings fit")
    if "disk" in dm.values() and not placement.offload_folder:
        raise InputError(f"the device map puts {sum(v == 'disk' for v in dm.values())} module(s) on disk: "
                         "give offload_folder (--offload-folder DIR) or more max_memory")
    hf = dispatch_model(hf, device_map=dm, offload_dir=placement.offload_folder)
    hf.hf_device_map = dict(dm)
    return hf


def _check_covers(hf: torch.nn.Module, dm: dict) -> None:
    modules = dict(hf.named_modules())
    unknown = [k for k in dm if k and k not in modules]
    if unknown:
        raise InputError(f"device_map names modules this model does not have: {unknown[:3]} "
                         f"(its top modules: {[n for n, _ in hf.named_children()]})")
    uncovered = [n for n, _ in hf.named_parameters()
                 if not any(k == "" or n == k or n.startswith(k + ".") for k in dm)]
    if uncovered:
        raise InputError(f"device_map leaves {len(uncovered)} parameter(s) without a device, e.g. {uncovered[0]}: "
                         "name their module (or a parent) too")


def device_map(hf: torch.nn.Module) -> dict | None:
    """The module -> device map of a model placed by accelerate (``device_map=``), or None for a plain one."""
    dm = getattr(hf, "hf_device_map", None)
    return dict(dm) if dm else None


def input_device(hf: torch.nn.Module) -> torch.device:
    """Where inputs go: the first GPU of the split (accelerate's main device), else the CPU; one-device models: theirs."""
    dm = getattr(hf, "hf_device_map", None)
    if dm:
        gpus = [v for v in dm.values() if isinstance(v, int) or (isinstance(v, str) and v.startswith(("cuda", "mps")))]
        return torch.device(f"cuda:{gpus[0]}" if gpus and isinstance(gpus[0], int) else (gpus[0] if gpus else "cpu"))
    p = next(hf.parameters())
    return p.device


def devices(hf: torch.nn.Module) -> list[str]:
    """The distinct devices the model's modules are mapped to, in first-use order (``['cpu']`` unsplit)."""
    dm = getattr(hf, "hf_device_map", None)
    if not dm:
        return [str(input_device(hf))]
    seen = []
    for v in dm.values():
        name = f"cuda:{v}" if isinstance(v, int) else str(v)
        if name not in seen:
            seen.append(name)
    return seen


def named_state(hf: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every entry of ``hf.state_dict()``; disk/CPU-offloaded weights are paged in
    module by module (never the whole model at once) from accelerate's offload store."""
    from contextlib import nullcontext

    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:  # no accelerate: nothing can be offloaded
        align_module_device = has_offloaded_params = None
    for prefix, module in hf.named_modules():
        offloaded = has_offloaded_params is not None and has_offloaded_params(module)
        with align_module_device(module, "cpu") if offloaded else nullcontext():
            own = {**module._parameters, **{k: b for k, b in module._buffers.items()
                                           if k not in module._non_persistent_buffers_set}}
            for key, t in own.items():
                if t is None:
                    continue
                if t.device.type == "meta":
                    raise ModelLoadError(f"{prefix}.{key} has no weights (meta tensor) and no offload hook to load them")
                yield (f"{prefix}.{key}" if prefix else key), t.detach()


def own_folder(hf: torch.nn.Module, placement: Placement) -> None:
    """Remove the placement's fresh offload folder when ``hf`` is collected (or at exit)."""
    if placement.offload_folder is not None:
        import shutil
        import weakref

        weakref.finalize(hf, shutil.rmtree, placement.offload_folder, True)


def drop_folder(placement: Placement) -> None:
    """Remove the fresh offload folder of a load that failed."""
    if placement.offload_folder is not None:
        import shutil

        shutil.rmtree(placement.offload_folder, ignore_errors=True)


def execution_device(module: torch.nn.Module) -> str:
    """Where ``module`` computes: accelerate's execution device for a placed block, else its weights' device.

    With a GPU in the split, blocks mapped to ``"cpu"`` or ``"disk"`` compute on the main GPU (their
    weights are paged in for each forward); without one, on the CPU.
    """
    hook = getattr(module, "_hf_hook", None)
    hooks = list(getattr(hook, "hooks", None) or ([hook] if hook is not None else []))
    for h in hooks:
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return _name(dev)
    p = next((t for t in module.parameters() if t.device.type != "meta"), None)
    return _name(p.device if p is not None else "cpu")


def _name(dev) -> str:
    return f"cuda:{dev}" if isinstance(dev, int) else str(torch.device(dev))


def paged_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s weights that accelerate pages in for each forward (offloaded to the CPU or disk)."""
    return sum(t.numel() * t.element_size() for t in module.parameters() if t.device.type == "meta")


def memory_plan(hf: torch.nn.Module, work_bytes: int, results_bytes: int) -> dict[str, int]:
    """Bytes each device needs beyond the weights it keeps, for a run whose attention call holds ``work_bytes``
    (one layer at a time, on the layer's execution device) and whose results (``results_bytes``) gather on the
    CPU: per device, the largest layer's working set plus the weights paged in for it."""
    from .. import families

    plan: dict[str, int] = {}
    for block in families.blocks(hf):
        dev = execution_device(block)
        plan[dev] = max(plan.get(dev, 0), work_bytes + paged_bytes(block))
    plan["cpu"] = plan.get("cpu", 0) + results_bytes
    return plan
