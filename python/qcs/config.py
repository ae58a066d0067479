"""The trainer's whole configuration, typed, in one place.

A run is described by a :class:`Config`:

- ``[model]``: the model family (``qcs``, ``dan``, ``pcd``, or one registered with
  :func:`qcs.families.register_family`) and the number of classes;
- one section named after the family (``[qcs]``, ``[dan]``, ``[pcd]``): the network's shape
  and its loss weights, a dataclass owned by the family (:attr:`Config.net`);
- ``[data]``, ``[optim]``, ``[train]``: shared by every family.

Presets ship as TOML files in ``qcs/configs`` (``qcs config show NAME`` prints one); a user
file or ``--set section.key=value`` overrides any field. Unknown or misplaced keys and wrong
types are :class:`ConfigError` naming the file (or override) and the key.

Checkpoints written before the per-family sections hold one flat ``[model]`` section and a
``[loss]`` section; :func:`upgrade_legacy` maps them onto the new layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli (a dependency)
    import tomli as tomllib


from .errors import CheckpointError, ConfigError
from .families import family_names, get_family

__all__ = [
    "FAMILY_PRESETS",
    "PAPER_PRESETS",
    "PRESETS",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "check_fields",
    "config_from_dict",
    "config_of_checkpoint",
    "load_config",
    "parse_val_split",
    "to_toml",
    "upgrade_legacy",
]

PAPER_PRESETS = tuple(f"paper-{v}-{d}" for v in ("qcs", "dcs")
                      for d in ("rafdb", "ferplus", "affectnet7", "affectnet8"))
PRESETS = ("tiny", "paper-qcs", "paper-dcs", "paper-baseline") + PAPER_PRESETS
FAMILY_PRESETS = ("tiny-dan", "tiny-pcd", "paper-dan", "paper-pcd")  # DAN / PCD families
DATA_FORMATS = ("synth", "raf-db", "ferplus", "affectnet7", "affectnet8", "folder")
SHARED = ("model", "data", "optim", "train")  # sections every config has


@dataclass
class ModelConfig:
    """Which network: the family (its shape lives in the family's own section) and the
    number of classes (``0`` takes the count from the dataset)."""

    family: str = "qcs"                   # a registered family: qcs | dan | pcd | ...
    num_classes: int = 0
    init: str = "default"                 # default | published | torch (qcs.models.init)


@dataclass
class DataConfig:
    """Where the images are and how they are read. Paths come from here or the CLI only."""

    format: str = "synth"                 # one of DATA_FORMATS
    root: str = ""                        # dataset root ("" + synth: the cached built-in data)
    train_list: str = ""                  # optional label-file overrides (relative to root)
    test_list: str = ""
    image_size: int = 224
    # the recipe's transforms (qcs.data.transforms): resize first to this (0: image_size),
    # then crop image_size (train: random, test: centre); rotation, jitter, erasing range
    resize: int = 0
    rotation: float = 0.0                 # RandomRotation degrees (0: none)
    color_jitter: bool = True             # ColorJitter(0.2, 0.2, 0.2, 0.1)
    erasing: list[float] = field(default_factory=lambda: [0.02, 0.1])  # RandomErasing area
    balanced: bool | None = None          # class-balanced anchors; None: on for AffectNet only
    epoch_divisor: int = 1                # items per epoch: len(train) // epoch_divisor
    # validation: none | official (FERPlus's FER2013Valid) | a fraction of the training
    # list held out per class (seeded by val_seed, independent of train.seed)
    val_split: str = "none"
    val_seed: int = 0
    cache_in_memory: bool = False         # decode every image once, keep uint8 tensors in RAM
    num_workers: int = 0
    check: bool = False                   # open every image at start-up, report all bad ones
    skip_bad: bool = False                # skip malformed list lines / unreadable images (counted)
    # built-in data (format "synth")
    synth_seed: int = 0
    synth_train_per_class: int = 300
    synth_test_per_class: int = 100
    synth_size: int = 100
    synth_bias: bool = False
    synth_bias_strength: float = 0.9


@dataclass
class OptimConfig:
    """Optimizer, SAM around it, and the learning-rate schedule (qcs.optim.schedule)."""

    name: str = "adam"                    # adam | adamw | sgd
    lr: float = 3e-6
    weight_decay: float = 1e-4
    momentum: float = 0.9                 # sgd only
    sam: bool = True
    sam_rho: float = 0.05
    sam_adaptive: bool = False
    lr_gamma: float = 0.98                # exponential schedule: lr *= lr_gamma each epoch
    schedule: str = "exponential"         # exponential (lr_gamma per epoch) | cosine (whole run)
    warmup_steps: int = 0                 # linear warm-up over this many optimizer steps
    min_lr_ratio: float = 0.0             # cosine: the last step's lr as a fraction of lr


@dataclass
class TrainConfig:
    """The run: epochs, batch, seed, device, precision, pretrained weights, checkpoints."""

    epochs: int = 200
    batch_size: int = 24                  # items (quadruplets / pairs / images) per step
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    amp: str = "none"                     # none | bf16 | fp16
    threads: int = 0                      # torch CPU threads; 0 keeps torch's default
    pretrained: str = ""                  # backbone weights (.pth or .safetensors)
    max_steps_per_epoch: int = 0          # 0: the whole epoch (a cap for quick runs)
    checkpoint_every: int = 0             # also save last.* every N steps (0: epoch ends only)
    # which split picks best.*: auto (validation when there is one, else test) | val | test
    # ("test" as the paper's scripts do: an optimistic estimate, named so in the output)
    select_on: str = "auto"


def _default_net() -> Any:
    return get_family("qcs").section()


@dataclass
class Config:
    """A whole run's configuration. ``net`` is the section of ``model.family`` (a
    dataclass of that family: :class:`qcs.families.qcs.QCSConfig`, ...)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    net: Any = field(default_factory=_default_net)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def family(self):
        """The :class:`qcs.families.Family` of ``model.family``."""
        return get_family(self.model.family)

    def sections(self) -> dict[str, Any]:
        """``{section name: dataclass}`` in file order (the family's section second)."""
        return {"model": self.model, self.model.family: self.net, "data": self.data,
                "optim": self.optim, "train": self.train}

    def to_dict(self) -> dict[str, Any]:
        """``{section: {key: value}}``, the layout of TOML files and checkpoint metadata."""
        return {name: dataclasses.asdict(obj) for name, obj in self.sections().items()}

    def validate(self) -> Config:
        """Check choices and ranges; raise :class:`ConfigError` naming the field."""
        if self.model.family not in family_names():
            raise ConfigError(f"model.family must be one of {family_names()}, got "
                              f"{self.model.family!r}")
        if not isinstance(self.net, self.family.section):
            raise ConfigError(f"the [{self.model.family}] section is a "
                              f"{type(self.net).__name__}, not {self.family.section.__name__}")
        d, o, t = self.data, self.optim, self.train
        check_fields("", self, [
            ("model.init", self.model.init in ("default", "published", "torch"),
             "default, published or torch"),
            ("data.format", d.format in DATA_FORMATS, f"one of {DATA_FORMATS}"),
            ("data.image_size", d.image_size >= 8, ">= 8"),
            ("data.resize", d.resize == 0 or d.resize >= d.image_size,
             "0 or >= data.image_size"),
            ("data.rotation", 0 <= d.rotation <= 180, "in [0, 180] degrees"),
            ("data.erasing", len(d.erasing) == 2 and 0 <= d.erasing[0] <= d.erasing[1] <= 1,
             "[lo, hi] with 0 <= lo <= hi <= 1"),
            ("data.epoch_divisor", d.epoch_divisor >= 1, ">= 1"),
            ("data.val_split", _val_split_ok(d.val_split),
             "none, official or a fraction in (0, 0.5] such as \"0.1\""),
            ("data.val_split", d.val_split != "official" or d.format == "ferplus",
             "a fraction such as \"0.1\" (only FERPlus has an official validation split)"),
            ("train.select_on", t.select_on in ("auto", "val", "test"), "auto, val or test"),
            ("optim.name", o.name in ("adam", "adamw", "sgd"), "adam, adamw or sgd"),
            ("optim.lr", o.lr > 0, "> 0"),
            ("optim.schedule", o.schedule in ("exponential", "cosine"), "exponential or cosine"),
            ("optim.warmup_steps", o.warmup_steps >= 0, ">= 0"),
            ("optim.min_lr_ratio", 0.0 <= o.min_lr_ratio <= 1.0, "in [0, 1]"),
            ("train.amp", t.amp in ("none", "bf16", "fp16"), "none, bf16 or fp16"),
            ("train.epochs", t.epochs >= 1, ">= 1"),
            ("train.batch_size", t.batch_size >= 1, ">= 1"),
            ("train.checkpoint_every", t.checkpoint_every >= 0, ">= 0"),
        ])
        check_fields(self.model.family, self.net, self.family.checks(self.net))
        return self


def parse_val_split(value: str) -> str | float:
    """``data.val_split``: ``"none"``, ``"official"`` or a fraction in ``(0, 0.5]`` given as
    text (``"0.1"``). Raises :class:`ValueError` naming the accepted forms."""
    text = str(value).strip().lower()
    if text in ("none", "official"):
        return text
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 0.5:
        raise ValueError(f"val_split must be none, official or a fraction in (0, 0.5] of the "
                         f"training list, got {value!r}")
    return fraction


def _val_split_ok(value: str) -> bool:
    try:
        parse_val_split(value)
    except ValueError:
        return False
    return True


def check_fields(section: str, obj: Any, checks: list[tuple[str, bool, str]]) -> None:
    """Raise :class:`ConfigError` ``"SECTION.KEY must be EXPECTED, got VALUE"`` for the first
    failed ``(key, ok, expected)`` check; keys are looked up on ``obj`` (``section.key``
    when ``section`` is empty)."""
    for name, ok, expected in checks:
        if ok:
            continue
        value = obj
        for part in name.split("."):
            value = getattr(value, part)
        full = f"{section}.{name}" if section else name
        raise ConfigError(f"{full} must be {expected}, got {value!r}")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a field's type hint (ints are accepted for floats)."""
    origin = getattr(hint, "__origin__", None)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list:
        (item,) = hint.__args__
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if hint == (bool | None):
        if value is None or isinstance(value, bool):
            return value
        if value == "auto":
            return None
        raise ConfigError(f"{where} must be true, false or \"auto\", got {value!r}")
    if hint in (int, float, str, bool):
        if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
            raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")  # pragma: no cover


def _where_else(key: str, cfg: Config, section: str) -> str:
    """Where ``key`` belongs when it is not a key of ``section`` (for the error message)."""
    homes = [name for name, obj in cfg.sections().items()
             if name != section and key in {f.name for f in dataclasses.fields(obj)}]
    homes += [name for name in family_names() if name not in cfg.sections()
              and key in {f.name for f in dataclasses.fields(get_family(name).section)}]
    if not homes:
        return ""
    return " (it belongs in " + " or ".join(f"[{h}]: {h}.{key}" for h in homes) + ")"


def _set_section(cfg: Config, section: str, values: dict[str, Any], source: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: [{section}] must be a table")
    obj = cfg.sections()[section]
    hints = get_type_hints(type(obj))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{source}: unknown key {section}.{key}"
                              f"{_where_else(key, cfg, section)}")
        setattr(obj, key, _coerce(value, hints[key], f"{source}: {section}.{key}"))


def _check_section_name(cfg: Config, section: str, source: str) -> None:
    if section in cfg.sections():
        return
    if section in family_names():
        raise ConfigError(f"{source}: [{section}] is the section of the {section} family, but "
                          f"model.family is {cfg.model.family!r} (set model.family = "
                          f"\"{section}\" or drop the section)")
    if section == "loss":
        raise ConfigError(f"{source}: there is no [loss] section: loss weights belong in the "
                          f"family's section ([{cfg.model.family}])")
    raise ConfigError(f"{source}: unknown section [{section}] (known: "
                      f"{list(cfg.sections())})")


def config_from_dict(data: dict[str, Any], source: str = "<dict>",
                     base: Config | None = None) -> Config:
    """Build a :class:`Config` from nested ``{section: {key: value}}`` on top of ``base``.

    ``model.family`` is applied first; a family other than ``base``'s starts its section
    from that family's defaults. Raises :class:`ConfigError` naming ``source`` and the key on
    unknown or misplaced keys and bad types."""
    cfg = copy_config(base) if base is not None else Config()
    model = data.get("model", {})
    if isinstance(model, dict) and "family" in model:
        family = _coerce(model["family"], str, f"{source}: model.family")
        if family not in family_names():
            raise ConfigError(f"{source}: model.family must be one of {family_names()}, got "
                              f"{family!r}")
        if family != cfg.model.family:
            cfg.model.family, cfg.net = family, get_family(family).section()
    for section, values in data.items():
        _check_section_name(cfg, section, source)
        _set_section(cfg, section, values, source)
    return cfg


def copy_config(cfg: Config) -> Config:
    """Deep copy (sections are mutable dataclasses)."""
    return Config(**{f.name: dataclasses.replace(getattr(cfg, f.name))
                     for f in dataclasses.fields(Config)})


def upgrade_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict of the flat layout (``[model]`` holding every network field, a
    ``[loss]`` section), as checkpoints written before the per-family sections hold it,
    mapped onto the current layout; a current dict is returned unchanged. ``None`` values
    (``"auto"``) are dropped."""
    data = {s: {k: v for k, v in vals.items() if v is not None} if isinstance(vals, dict)
            else vals for s, vals in data.items()}
    model = data.get("model", {})
    own = {f.name for f in dataclasses.fields(ModelConfig)}  # family, num_classes, init
    legacy = "loss" in data or any(k not in own for k in model)
    if not legacy:
        return data
    family = model.get("family", "qcs")
    flat = {**data.pop("loss", {}), **model}
    section = get_family(family).upgrade_legacy(flat)
    data["model"] = {"family": family, "num_classes": model.get("num_classes", 0)}
    data[family] = section
    return data


def config_of_checkpoint(meta: dict[str, Any], where: str) -> Config:
    """The config stored in a checkpoint's metadata ``meta`` (either layout; see
    :func:`upgrade_legacy`); ``where`` names the file in errors."""
    if "config" not in meta:
        raise CheckpointError(f"{where} has no 'config' entry")
    return config_from_dict(upgrade_legacy(meta["config"]), where).validate()


def _read_toml(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    source = str(name_or_path)
    if source in PRESETS + FAMILY_PRESETS:
        text = resources.files("qcs").joinpath("configs", f"{source}.toml").read_text()
        source = f"preset {source}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found (presets: "
                              f"{', '.join(PRESETS + FAMILY_PRESETS)})")
        text = path.read_text()
    try:
        return tomllib.loads(text), source
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc


def load_config(name_or_path: str | Path, *, legacy: bool = False) -> Config:
    """Load a preset by name (``tiny``, ``paper-qcs``, ...) or a TOML file by path.

    A file may start from a preset with a top-level ``preset = "paper-qcs"`` line.
    ``legacy=True`` also reads the flat layout of older run directories."""
    data, source = _read_toml(name_or_path)
    base = None
    preset = data.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS + FAMILY_PRESETS:
            raise ConfigError(f"{source}: unknown preset {preset!r} (known: "
                              f"{', '.join(PRESETS + FAMILY_PRESETS)})")
        base = load_config(preset)
    if legacy:
        data = upgrade_legacy(data)
    return config_from_dict(data, source, base).validate()


def _parse_value(text: str) -> Any:
    """TOML literal if it parses (``3``, ``1e-4``, ``true``, ``[1, 2]``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (the CLI's ``--set``) and validate; returns a new
    config (``cfg`` is not modified)."""
    data: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        key, value = item.split("=", 1)
        section, name = key.strip().split(".", 1)
        data.setdefault(section, {})[name] = _parse_value(value.strip())
    return config_from_dict(data, "--set", cfg).validate()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")  # pragma: no cover


def to_toml(cfg: Config) -> str:
    """The config as TOML that :func:`load_config` reads back to an equal config
    (``None`` values, i.e. "auto", are left out: they are the defaults)."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
