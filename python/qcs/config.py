"""The trainer's whole configuration, typed, in one place.

A run is described by a :class:`Config` (model, data, optimiser, loss, training). Presets
ship as TOML files in ``qcs/configs`` (``tiny``, ``paper-qcs``, ``paper-dcs``,
``paper-baseline``); a user file or ``--set section.key=value`` overrides any field. Unknown
keys and wrong types are errors that name the file (or override) and the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

__all__ = [
    "ModelConfig", "DataConfig", "OptimConfig", "LossConfig", "TrainConfig", "Config",
    "ConfigError", "PRESETS", "load_config", "apply_overrides", "config_from_dict", "to_toml",
]

PRESETS = ("tiny", "paper-qcs", "paper-dcs", "paper-baseline")
FAMILY_PRESETS = ("tiny-dan", "tiny-pcd", "paper-dan", "paper-pcd")  # DAN / PCD families
VARIANTS = ("qcs", "dcs", "baseline")
FAMILIES = ("qcs", "dan", "pcd")  # qcs: the variants above; dan, pcd: qcs.models.dan / .pcd
DATA_FORMATS = ("synth", "raf-db", "ferplus", "affectnet7", "affectnet8", "folder")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass
class ModelConfig:
    """Network shape. ``num_classes = 0`` takes the count from the dataset."""

    family: str = "qcs"                   # qcs (with variant) | dan | pcd (see FAMILIES)
    variant: str = "qcs"                  # qcs (4 branches) | dcs (2) | baseline (no cross branch)
    num_classes: int = 0
    backbone_depths: list[int] = field(default_factory=lambda: [3, 4, 14])  # IR50 stages 1-3
    backbone_widths: list[int] = field(default_factory=lambda: [64, 128, 256])
    backbone_size: int = 112              # the backbone resizes its input to this (paper: 112)
    embed_dim: int = 768
    tokens_side: int = 7                  # each level is embedded to side x side tokens
    vit_depth: int = 2
    vit_cross_depth: int = 1
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0                  # dropout in the ViT modules and cross MLPs
    attn_dropout: float = 0.0
    csa_gamma: float = 1.0
    csa_mode: str = "sd"
    csa_scope: str = "batch"
    backend: str = "auto"                 # qcs_ext backend: auto | fused | reference
    # DAN (family "dan"): torchvision-style ResNet trunk (resnet18: [2,2,2,2], [64..512])
    resnet_layers: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    resnet_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    dan_heads: int = 4
    # PCD (family "pcd"): landmark source heatmap (stored beside the images) | mobilefacenet
    landmarks: str = "heatmap"
    heatmap_channels: int = 3             # left eye, right eye, mouth
    landmark_widths: list[int] = field(default_factory=lambda: [64, 64, 128])
    landmark_weights: str = ""            # frozen MobileFaceNet-style weights (user file)
    neutral_class: int = -1               # NeAA's neutral class; -1: the class named neutral


@dataclass
class DataConfig:
    """Where the images are and how they are read. Paths come from here or the CLI only."""

    format: str = "synth"                 # one of DATA_FORMATS
    root: str = ""                        # dataset root ("" + synth: the cached built-in data)
    train_list: str = ""                  # optional label-file overrides (relative to root)
    test_list: str = ""
    image_size: int = 224
    balanced: bool | None = None          # class-balanced anchors; None: on for AffectNet only
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
    name: str = "adam"                    # adam | adamw | sgd
    lr: float = 3e-6
    weight_decay: float = 1e-4
    momentum: float = 0.9                 # sgd only
    sam: bool = True
    sam_rho: float = 0.05
    sam_adaptive: bool = False
    lr_gamma: float = 0.98                # ExponentialLR, stepped once per epoch


@dataclass
class LossConfig:
    distill: str = "none"                 # none | kl | mse (between base and cross logits)
    distill_weight: float = 0.0
    temperature: float = 1.0              # KL temperature
    affinity_weight: float = 1.0          # DAN lambda1
    partition_weight: float = 1.0         # DAN lambda2
    neaa_weight: float = 0.01             # PCD


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 24                  # items (quadruplets / pairs / images) per step
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    amp: str = "none"                     # none | bf16 | fp16
    threads: int = 0                      # torch CPU threads; 0 keeps torch's default
    pretrained: str = ""                  # IR50 weights (.pth or .safetensors)
    max_steps_per_epoch: int = 0          # 0: the whole epoch (a cap for quick runs)
    checkpoint_every: int = 0             # also save last.* every N steps (0: epoch ends only)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Check choices and ranges; raise :class:`ConfigError` naming the field."""
        checks = [
            ("model.variant", self.model.variant in VARIANTS, f"one of {VARIANTS}"),
            ("model.family", self.model.family in FAMILIES, f"one of {FAMILIES}"),
            ("model.resnet_layers", len(self.model.resnet_layers) == 4
             and all(n >= 1 for n in self.model.resnet_layers), "four block counts >= 1"),
            ("model.resnet_widths", len(self.model.resnet_widths) == 4
             and all(w >= 1 for w in self.model.resnet_widths), "four widths >= 1"),
            ("model.dan_heads", self.model.dan_heads >= 1, ">= 1"),
            ("model.landmarks", self.model.landmarks in ("heatmap", "mobilefacenet"),
             "heatmap or mobilefacenet"),
            ("model.landmark_widths", len(self.model.landmark_widths) == 3, "three widths"),
            ("model.csa_mode", self.model.csa_mode in ("sd", "s", "d"), "sd, s or d"),
            ("model.csa_scope", self.model.csa_scope in ("batch", "sample"), "batch or sample"),
            ("model.backend", self.model.backend in ("auto", "fused", "reference"),
             "auto, fused or reference"),
            ("model.backbone_depths", len(self.model.backbone_depths) == 3
             and all(d >= 1 for d in self.model.backbone_depths), "three depths >= 1"),
            ("model.backbone_widths", len(self.model.backbone_widths) == 3
             and all(w >= 1 for w in self.model.backbone_widths), "three widths >= 1"),
            ("model.embed_dim", self.model.embed_dim % self.model.heads == 0,
             "a multiple of model.heads"),
            ("model.backbone_size", _power_of_two_ratio(self.model.backbone_size,
                                                         8 * self.model.tokens_side),
             "8 * tokens_side * 2^k (paper: 112 = 8 * 7 * 2; tiny: 56)"),
            ("data.format", self.data.format in DATA_FORMATS, f"one of {DATA_FORMATS}"),
            ("data.image_size", self.data.image_size >= 8, ">= 8"),
            ("optim.name", self.optim.name in ("adam", "adamw", "sgd"), "adam, adamw or sgd"),
            ("optim.lr", self.optim.lr > 0, "> 0"),
            ("loss.distill", self.loss.distill in ("none", "kl", "mse"), "none, kl or mse"),
            ("train.amp", self.train.amp in ("none", "bf16", "fp16"), "none, bf16 or fp16"),
            ("train.epochs", self.train.epochs >= 1, ">= 1"),
            ("train.batch_size", self.train.batch_size >= 1, ">= 1"),
            ("train.checkpoint_every", self.train.checkpoint_every >= 0, ">= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                section, key = name.split(".")
                value = getattr(getattr(self, section), key)
                raise ConfigError(f"{name} must be {expected}, got {value!r}")
        return self


def _power_of_two_ratio(value: int, unit: int) -> bool:
    ratio, rest = divmod(value, unit)
    return rest == 0 and ratio >= 1 and ratio & (ratio - 1) == 0


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


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


def config_from_dict(data: dict[str, Any], source: str = "<dict>",
                     base: Config | None = None) -> Config:
    """Build a :class:`Config` from nested ``{section: {key: value}}`` on top of ``base``.

    Raises :class:`ConfigError` naming ``source`` and the key on unknown keys or bad types.
    """
    cfg = config_from_dict_copy(base) if base is not None else Config()
    for section, values in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {list(_SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        obj = getattr(cfg, section)
        hints = get_type_hints(type(obj))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {section}.{key}")
            setattr(obj, key, _coerce(value, hints[key], f"{source}: {section}.{key}"))
    return cfg


def config_from_dict_copy(cfg: Config) -> Config:
    """Deep copy (sections are mutable dataclasses)."""
    return Config(**{name: dataclasses.replace(getattr(cfg, name)) for name in _SECTIONS})


def load_config(name_or_path: str | Path) -> Config:
    """Load a preset by name (``tiny``, ``paper-qcs``, ...) or a TOML file by path.

    A file may start from a preset with a top-level ``preset = "paper-qcs"`` line.
    """
    text: str
    source = str(name_or_path)
    if str(name_or_path) in PRESETS + FAMILY_PRESETS:
        text = resources.files("qcs").joinpath("configs", f"{name_or_path}.toml").read_text()
        source = f"preset {name_or_path}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found (presets: {', '.join(PRESETS)})")
        text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
    base = None
    preset = data.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS + FAMILY_PRESETS:
            raise ConfigError(f"{source}: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        base = load_config(preset)
    return config_from_dict(data, source, base).validate()


def _parse_value(text: str) -> Any:
    """TOML literal if it parses (``3``, ``1e-4``, ``true``, ``[1, 2]``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (the CLI's ``--set``) and validate."""
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
