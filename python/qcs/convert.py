"""Import the published QCS / DCS checkpoints (github.com/birdwcp/QCS) into our format.

Their ``.pth`` files are whole training states written by ``torch.save``: a dict holding
``state_dict`` (``module.``-prefixed keys, from ``nn.DataParallel``), ``epoch``,
``best_acc``, the SAM/Adam ``optimizer`` state and ``recorder`` / ``recorder_m`` objects
whose classes live in the authors' ``__main__`` (with numpy arrays inside).

Reading such a file never runs code from it. It goes through torch's ``weights_only``
unpickler, which builds tensors and plain containers only; every other global the pickle
names (the recorders' classes, numpy's reconstructors, ``builtins.exec`` in a hostile
file, ...) is first found by a static scan of the pickle and allow-listed *as an inert
stand-in*: a class that records its name and arguments and does nothing else, so a
``__reduce__`` that would call ``exec`` calls the stand-in instead. Globals from ``os``,
``sys``, ``posix`` and ``nt`` are refused outright (torch blocks them too).

The weights are then renamed onto :class:`qcs.models.QCSNet` (:func:`official_key`;
the older ``embed_q/k/v`` and the newer ``embed_1/2/3`` names both map), checked against
our model (missing, unexpected, shape-mismatched keys) and written as our safetensors
checkpoint with :func:`qcs.checkpoint.save_checkpoint`.
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING  # what unpicklers apply to protocol 2
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConvertError

__all__ = [
    "ConvertError",
    "ConvertReport",
    "InertStandIn",
    "convert_official",
    "load_untrusted",
    "matching_preset",
    "official_key",
    "pickle_globals",
    "published_form",
]

# modules no checkpoint needs; torch's weights_only unpickler refuses them as well
_REFUSED_MODULES = ("os", "sys", "posix", "nt", "subprocess")


class InertStandIn:
    """Takes the place of a class or function the checkpoint names but we do not load.

    Constructing, calling (pickle's REDUCE) or restoring state (BUILD) only stores the
    arguments; no code of the original is ever looked up or run."""

    _qcs_global = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertStandIn:
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # __new__ kept the arguments; nothing else happens

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<inert stand-in for {self._qcs_global}>"


def _stand_in(name: str) -> type:
    return type(f"StandIn[{name}]", (InertStandIn,), {"_qcs_global": name})


def _globals_in(stream: io.BufferedIOBase | io.BytesIO) -> set[str]:
    """The ``module.name`` of every GLOBAL opcode of the next pickle in ``stream``."""
    found = set()
    for op, arg, _ in pickletools.genops(stream):
        if op.name == "GLOBAL":  # protocol <= 3 (torch.save); arg is "module name"
            module, name = str(arg).split(" ", 1)
            # Python 2 names (__builtin__.exec) resolve to Python 3 ones, as when loading
            if (module, name) in NAME_MAPPING:
                module, name = NAME_MAPPING[(module, name)]
            elif module in IMPORT_MAPPING:
                module = IMPORT_MAPPING[module]
            found.add(f"{module}.{name}")
    return found


def pickle_globals(path: str | Path) -> set[str]:
    """Every global a ``torch.save`` file's pickle names (new zip format: ``data.pkl``;
    legacy format: the header pickles and the object pickle). Static: nothing is built."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if not names:
                    raise ConvertError(f"{path}: a zip file without data.pkl is not a "
                                       "torch.save checkpoint")
                return _globals_in(io.BytesIO(zf.read(names[0])))
        found: set[str] = set()
        with path.open("rb") as fh:  # legacy: magic number, protocol, sys info, the object
            for _ in range(4):
                found |= _globals_in(fh)
        return found
    except ConvertError:
        raise
    except (ValueError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise ConvertError(f"{path} is not a torch.save checkpoint: {exc}") from None


def load_untrusted(path: str | Path) -> tuple[Any, list[str]]:
    """Read a foreign ``torch.save`` file without running code from it.

    Returns ``(object, stand-ins)``: tensors (on the CPU) and plain containers as saved,
    every other object an :class:`InertStandIn`; ``stand-ins`` lists the globals replaced.
    Raises :class:`ConvertError` for unreadable files and for pickles naming ``os``,
    ``sys``, ``posix``, ``nt`` or ``subprocess``."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"checkpoint {path} not found")
    names = pickle_globals(path)
    refused = sorted(n for n in names if n.split(".")[0] in _REFUSED_MODULES)
    if refused:
        raise ConvertError(f"refusing {path}: its pickle names {', '.join(refused)}, which no "
                           "checkpoint needs (the file would run code when loaded with "
                           "torch.load(weights_only=False))")
    from torch import _weights_only_unpickler
    allowed = set(getattr(_weights_only_unpickler, "_get_allowed_globals", dict)())
    # torch resolves its own allow-list first, so a stand-in never shadows a real rebuilder
    replaced = sorted(names - allowed)
    try:
        with torch.serialization.safe_globals([(_stand_in(n), n) for n in replaced]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # foreign input: many error types; say which file and why
        raise ConvertError(f"cannot read {path} (tensors, plain containers and inert "
                           f"stand-ins only): {exc}") from None
    return obj, replaced


# ----------------------------------------------------------------------------- key mapping

# parts of the official modules that their forward pass never uses: dropped, not errors
_UNUSED = re.compile(r"^(ir_back\.output_layer\.|fusion\.|"  # fusion: 8-class DCS AffectNet
                     r"VIT_(base|cross)\.(patch_embed\.|eca_block\.|"
                     r"CON1\.|IRLinear[12]\.|head_dist\.|dist_token$|pre_logits\.|"
                     r"blocks\.\d+\.conv\.))")
# renames inside a ViT / cross module (the cross module's "proj" is our "qkv")
_INNER = [(re.compile(r"(^|\.)mlp\.fc1\."), r"\1mlp.0."),
          (re.compile(r"(^|\.)mlp\.fc2\."), r"\1mlp.3."),
          (re.compile(r"^se_block\.linear1\."), "se.0."),
          (re.compile(r"^se_block\.linear2\."), "se.2."),
          (re.compile(r"^head\.linear\."), "head."), (re.compile(r"^proj\."), "qkv.")]


def official_key(key: str, stage_starts: tuple[int, ...] = (0, 3, 7)) -> str | None:
    """Our name for the official (``module.``-stripped) ``key``; ``None`` for weights the
    official network holds but never uses. Unknown keys come back unchanged (and then do
    not match our model). ``stage_starts``: index of each backbone stage's first unit in
    our flat ``ir_back.body`` (the official IR50 has ``body1/2/3``)."""
    if _UNUSED.match(key):
        return None
    if m := re.match(r"^ir_back\.body([123])\.(\d+)\.(.*)$", key):
        return f"ir_back.body.{stage_starts[int(m[1]) - 1] + int(m[2])}.{m[3]}"
    if m := re.match(r"^conv([123])\.(.*)$", key):
        return f"embeds.{int(m[1]) - 1}.down.{m[2]}"
    if m := re.match(r"^embed_(?:1|q)\.([01])\.(.*)$", key):
        return f"embeds.0.embed.{m[1]}.{m[2]}"
    if m := re.match(r"^embed_(?:2|k)\.0\.(.*)$", key):
        return f"embeds.1.embed.0.{m[1]}"
    if m := re.match(r"^embed_(?:3|v)\.proj\.(.*)$", key):
        return f"embeds.2.embed.0.{m[1]}"
    for pattern, ours in ((r"^cross_attention_([123])\.(.*)$", "cross"),
                          (r"^VIT_(base|cross)\.(.*)$", "vit")):
        if m := re.match(pattern, key):
            inner = m[2]
            for rx, repl in _INNER:  # anchored: a ViT's blocks.N.attn.proj stays
                inner = rx.sub(repl, inner)
            prefix = f"cross.{int(m[1]) - 1}" if ours == "cross" else f"vit_{m[1]}"
            return f"{prefix}.{inner}"
    return key


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


@dataclass
class ConvertReport:
    """What :func:`convert_official` found and did."""

    source: str
    variant: str
    num_classes: int
    epoch: int
    loaded: int = 0
    dropped: list[str] = field(default_factory=list)      # official keys the network never uses
    missing: list[str] = field(default_factory=list)      # ours, not in the file (kept at init)
    unexpected: list[str] = field(default_factory=list)   # the file's, not in our model
    mismatched: list[str] = field(default_factory=list)   # same name, other shape
    stand_ins: list[str] = field(default_factory=list)    # globals read as inert stand-ins
    other_entries: list[str] = field(default_factory=list)  # top-level entries not imported

    def __str__(self) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        form = published_form(self.variant, self.num_classes)
        lines = [f"{self.source}: {self.variant} network, {self.num_classes} classes "
                 f"(backbone resize {form['backbone_resize']}, cross residual "
                 f"{form['cross_residual']}), epoch "
                 f"{self.epoch}: {self.loaded} tensors loaded, {len(self.dropped)} unused "
                 f"official tensors dropped, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected"]
        for name, keys in (("missing (left at initialisation)", self.missing),
                           ("unexpected (ignored)", self.unexpected),
                           ("shape-mismatched", self.mismatched),
                           ("not imported", self.other_entries),
                           ("read as inert stand-ins", self.stand_ins)):
            if keys:
                lines.append(f"  {name}: {few(keys)}")
        return "\n".join(lines)


def published_form(variant: str, num_classes: int) -> dict[str, str]:
    """The model settings that make our network compute the published one for a checkpoint
    of ``variant`` with ``num_classes`` classes: the backbone's nearest-neighbour resize
    always, and the cross modules' residual stream (the published 8-class DCS modules keep
    the un-normalised input as their residual; every other published module the
    normalised one)."""
    residual = "input" if variant == "dcs" and num_classes == 8 else "normed"
    return {"backbone_resize": "nearest", "cross_residual": residual}


def matching_preset(variant: str, data_format: str) -> str:
    """The preset of the authors' training script for a checkpoint of ``variant`` trained on
    ``data_format`` (``paper-baseline`` for the baseline, which has no script): its
    evaluation transform is the script's."""
    if variant == "baseline":
        return "paper-baseline"
    return f"paper-{variant}-{data_format.replace('-', '')}"


def _variant_of(state: dict[str, torch.Tensor]) -> str:
    if "cross_attention_1.theta" in state:
        return "qcs"
    return "dcs" if any(k.startswith("cross_attention_") for k in state) else "baseline"


def convert_official(src: str | Path, out_base: str | Path, *, config=None,
                     data_format: str | None = None, strict: bool = True,
                     overrides: list[str] | tuple[str, ...] = ()) -> ConvertReport:
    """Convert the official checkpoint ``src`` into our checkpoint ``out_base``
    (``out_base.safetensors`` + ``.json``; no optimizer state).

    Args:
        config: a :class:`qcs.config.Config` for the model's shape and the evaluation
            transform (default: :func:`matching_preset`, the preset of the authors' script);
            variant and class count come from the file, and :func:`published_form` always
            applies.
        overrides: ``section.key=value`` changes to that config (the CLI's ``--set``).
        data_format: whose class order the labels follow (``raf-db``, ``ferplus``,
            ``affectnet7``, ``affectnet8``); default ``raf-db`` for 7 classes, required for
            8 (FERPlus and AffectNet-8 order them differently).
        strict: refuse missing or unexpected keys (they are always listed); shape
            mismatches are always refused.
    """
    from .checkpoint import save_checkpoint
    from .config import apply_overrides, load_config
    from .families import build_model

    src = Path(src)
    obj, stand_ins = load_untrusted(src)
    raw = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(raw, dict) or not raw or not all(
            isinstance(v, torch.Tensor) for v in raw.values()):
        top = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ConvertError(f"{src} holds no state dict of tensors (top level: {top})")
    state = {_strip_module(k): v for k, v in raw.items()}
    head = state.get("VIT_base.head.linear.weight")
    if head is None or head.dim() != 2:
        raise ConvertError(f"{src}: no VIT_base.head.linear.weight, so not a QCS / DCS / "
                           "POSTER++-style checkpoint (keys start with "
                           f"{sorted({k.split('.')[0] for k in state})})")
    num_classes = int(head.shape[0])
    data_format, classes = _classes_of(src, num_classes, data_format)

    cfg = config if config is not None else load_config(matching_preset(_variant_of(state),
                                                                        data_format))
    if overrides:
        cfg = apply_overrides(cfg, list(overrides))
    if cfg.model.family != "qcs":
        raise ConvertError(f"official checkpoints are QCS-family networks; the config's "
                           f"model.family is {cfg.model.family!r}")
    cfg.net.variant = _variant_of(state)
    cfg.model.num_classes = num_classes
    for key, value in published_form(cfg.net.variant, num_classes).items():
        setattr(cfg.net, key, value)  # whatever --config says: the published network
    cfg.data.format = data_format
    cfg.validate()
    model = build_model(cfg)
    starts = (0, *model.ir_back.stage_ends[:-1])
    report = ConvertReport(str(src), cfg.net.variant, num_classes,
                           _plain_int(obj.get("epoch", 0)) if isinstance(obj, dict) else 0,
                           stand_ins=stand_ins)
    if isinstance(obj, dict):
        report.other_entries = [str(k) for k in obj if k not in ("state_dict", "epoch")]
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ours = official_key(key, starts)
        if ours is None:
            report.dropped.append(key)
        else:
            mapped[ours] = value
    own = model.state_dict()
    report.unexpected = [k for k in mapped if k not in own]
    report.missing = [k for k in own if k not in mapped]
    report.mismatched = [f"{k} {tuple(mapped[k].shape)} vs ours {tuple(v.shape)}"
                         for k, v in own.items() if k in mapped and mapped[k].shape != v.shape]
    if report.mismatched or (strict and (report.missing or report.unexpected)):
        hint = "" if report.mismatched else "; --no-strict converts anyway"
        raise ConvertError(f"{src} does not fit the {cfg.net.variant} network of this config "
                           f"(choose it with --config / --set{hint}):\n{report}")
    load = {k: v for k, v in mapped.items() if k in own}
    model.load_state_dict(load, strict=False)
    report.loaded = len(load)
    save_checkpoint(out_base, model, _metadata(obj, cfg, classes, report, src))
    return report


def _classes_of(src: Path, num_classes: int, data_format: str | None
                ) -> tuple[str, tuple[str, ...]]:
    """The dataset format whose class order the file's labels follow, and its classes."""
    from .data.datasets import AFFECTNET_CLASSES, FERPLUS_CLASSES, RAF_DB_CLASSES
    classes_by_format = {"raf-db": RAF_DB_CLASSES, "ferplus": FERPLUS_CLASSES,
                         "affectnet7": AFFECTNET_CLASSES[:7], "affectnet8": AFFECTNET_CLASSES}
    if data_format is None:
        if num_classes != 7:
            raise ConvertError(f"{src} has {num_classes} classes: pass --data ferplus or --data "
                               "affectnet8 (their class orders differ)")
        data_format = "raf-db"
    if data_format not in classes_by_format:
        raise ConvertError(f"--data must be one of {sorted(classes_by_format)}, got "
                           f"{data_format!r}")
    classes = classes_by_format[data_format]
    if len(classes) != num_classes:
        raise ConvertError(f"{src} has {num_classes} classes but {data_format} has "
                           f"{len(classes)}")
    return data_format, classes


def _metadata(obj: Any, cfg, classes, report: ConvertReport, src: Path) -> dict[str, Any]:
    """Our checkpoint metadata for a converted file (its best accuracy, if recorded)."""
    best = obj.get("best_acc") if isinstance(obj, dict) else None
    best_pct = float(best) if isinstance(best, (int, float, torch.Tensor)) and (
        not isinstance(best, torch.Tensor) or best.numel() == 1) else None
    return {"config": cfg.to_dict(), "classes": list(classes), "epoch": report.epoch,
            "metrics": {}, "best_acc": best_pct / 100 if best_pct is not None else 0.0,
            "best_epoch": report.epoch, "data_root": "",
            "converted_from": {"file": str(src), "format": "official QCS (torch.save)",
                               "best_acc_percent": best_pct, "dropped": report.dropped,
                               "missing": report.missing, "unexpected": report.unexpected,
                               "stand_ins": report.stand_ins}}


def _plain_int(value: Any) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return int(value)
    return value if isinstance(value, int) else 0
