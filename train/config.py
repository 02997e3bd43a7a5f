"""Training configuration: a YAML file plus ``dotted.key=value`` overrides, checked into dataclasses.

Defaults are the authors' settings (``official_method_facts.md`` sections 7-12: README command, ``utils/parser.py``,
``config_files/losses.yaml``). Every error names the key it is about, e.g. ``optim.lr_encoder: expected a number``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from lcmla_sdk.errors import LcmlaError

MIXED_PRECISION = ("no", "fp16", "bf16")
LANDMARK_SOURCES = ("detector", "template")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


class ConfigError(LcmlaError, ValueError):
    """A training configuration that cannot be used; the message starts with the offending key."""


@dataclass
class DataSetConfig:
    """One image set in the authors' layout: ``metadata.json`` maps paths relative to ``root`` to identity labels."""

    root: str
    metadata: str = "metadata.json"
    weight: float = 1.0  # relative sampling weight when several sets are mixed
    prompt_in_filename: bool = True  # "A_photo_of_conceptname_123.jpg" -> "A photo of face"
    concept_placeholder: str = "face"
    prompt: str = "A photo of a face"  # every image's prompt when prompt_in_filename is false
    vanilla_only_references: bool = True  # references restricted to paths containing "vanilla"


@dataclass
class DataConfig:
    sets: list[DataSetConfig]
    resolution: int = 1024
    num_workers: int = 2
    max_redraws: int = 32  # a sample whose files are unusable is redrawn at most this many times


@dataclass
class FacesConfig:
    """Where the 5-point landmarks for the identity loss's alignment come from."""

    landmarks: str = "detector"  # "detector": insightface pack; "template": faces already centred and aligned
    pack: Optional[str] = None  # insightface model pack directory (holds the detection ONNX model)
    det_size: int = 640
    det_thresh: float = 0.5


@dataclass
class ArcFaceConfig:
    weights: Optional[str] = None  # insightface .onnx, arcface_torch .pth, pSp IR-SE .pth or .safetensors
    arch: Optional[str] = None  # only for random weights (presets): a name from lcmla_sdk.train.arcface.ARCHS


@dataclass
class OptimConfig:
    lr_encoder: float = 5e-6  # KV-encoder LoRA + K/V-projection LoRA
    lr_adapter: float = 1e-5  # resampler + IP K/V projections
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0


@dataclass
class DiffusionLossConfig:
    weight: float = 1.0
    importance_alpha: float = 0.5  # p(t) proportional to 1 - alpha cos(pi t / T)


@dataclass
class LcmScaleConfig:
    full_prob: float = 0.5  # the LCM-LoRA scale is 1 with this probability ...
    min: float = 0.1  # ... else uniform in [min, 1]
    every: int = 5  # redrawn every this many steps


@dataclass
class LookaheadConfig:
    every: int = 1  # a lookahead step every this many steps; 0 disables it
    batch_size: int = 4  # on the first samples of the batch
    max_timestep: int = 1000
    importance_alpha: float = 0.2
    identity_weight: float = 1e-3
    # DreamSim (the authors' second lookahead loss, weight 1e-3): a local folder of its weights; without one the
    # trainer warns and trains without it. dreamsim_weight 0 turns it off knowingly.
    dreamsim: Optional[str] = None
    dreamsim_weight: float = 1e-3
    perceptual: Optional[str] = None  # "package.module:factory" building a loss(preview, reference) -> (B,)
    perceptual_kwargs: dict = field(default_factory=dict)
    perceptual_weight: float = 1e-3
    timestep_scaling: float = 10.0  # LCM boundary condition; sigma_data is 0.5 (diffusers' LCMScheduler)
    lcm_scale: LcmScaleConfig = field(default_factory=LcmScaleConfig)


@dataclass
class DropoutConfig:
    kv_tokens: float = 0.05  # per layer, per token, the same mask over the batch
    adapter: float = 0.1  # per sample: image tokens -> unconditional tokens (diffusion step only)


@dataclass
class CheckpointConfig:
    every: int = 500
    keep: int = 3  # newest checkpoints kept; 0 keeps all


@dataclass
class LoggingConfig:
    tracker: Optional[str] = "tensorboard"  # any accelerate tracker name, or null
    every: int = 10
    preview_every: int = 250  # 0: no preview images
    check_sync_every: int = 0  # several processes: compare the trainables' checksum across ranks


@dataclass
class TrainConfig:
    output_dir: str
    data: DataConfig
    model: str = "tiny"  # embedded preset or model directory
    tiny_vae: Optional[str] = None  # diffusers AutoencoderTiny directory (TAESD-XL); null: random (presets only)
    seed: int = 0
    batch_size: int = 4
    max_steps: int = 5001
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = True
    combined_step: bool = False  # one backward/optimiser step for both losses instead of two
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    diffusion: DiffusionLossConfig = field(default_factory=DiffusionLossConfig)
    lookahead: LookaheadConfig = field(default_factory=LookaheadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    faces: FacesConfig = field(default_factory=FacesConfig)
    arcface: ArcFaceConfig = field(default_factory=ArcFaceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read ``path`` (YAML), apply ``key.sub=value`` overrides (values parsed as YAML), check, return the config."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: no such file: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config: {path} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config: {path} must hold a mapping at the top level")
    for override in overrides:
        _apply_override(raw, override)
    config = _build(TrainConfig, raw, "")
    _validate(config)
    return config


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    config = _build(TrainConfig, raw, "")
    _validate(config)
    return config


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key.path=value")
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(part, node, where)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{where}: is a value, cannot set {key}")
    value = yaml.safe_load(text)
    if isinstance(node, list):
        node[_list_index(parts[-1], node, key)] = value
    else:
        node[parts[-1]] = value


def _list_index(part: str, items: list, where: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"{where}: list index out of range (the list has {len(items)} items)")
    return int(part)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0])}: unknown key; expected one of {sorted(fields)}")
    values = {}
    for name, spec in fields.items():
        key = _join(where, name)
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], key)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is list:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{key}: expected a non-empty list")
        return [_coerce(args[0], item, f"{key}.{i}") for i, item in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values")
        return tuple(_coerce(a, v, f"{key}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        try:  # YAML reads 1e-5 (no dot) as a string
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {hint!r}")  # a bug in this module, not in the config


def _validate(config: TrainConfig) -> None:
    checks = [
        ("mixed_precision", config.mixed_precision in MIXED_PRECISION, f"must be one of {MIXED_PRECISION}"),
        ("faces.landmarks", config.faces.landmarks in LANDMARK_SOURCES, f"must be one of {LANDMARK_SOURCES}"),
        ("faces.pack", config.faces.landmarks != "detector" or config.faces.pack is not None,
         "required when faces.landmarks is 'detector' (or use 'template' for pre-aligned faces)"),
        ("optim.lr_schedule", config.optim.lr_schedule in LR_SCHEDULES, f"must be one of {LR_SCHEDULES}"),
        ("batch_size", config.batch_size >= 1, "must be at least 1"),
        ("max_steps", config.max_steps >= 1, "must be at least 1"),
        ("data.resolution", config.data.resolution >= 8, "must be at least 8"),
        ("data.num_workers", config.data.num_workers >= 0, "must not be negative"),
        ("data.max_redraws", config.data.max_redraws >= 1, "must be at least 1"),
        ("lookahead.every", config.lookahead.every >= 0, "must not be negative (0 disables the lookahead step)"),
        ("lookahead.batch_size", config.lookahead.batch_size >= 1, "must be at least 1"),
        ("lookahead.max_timestep", 1 <= config.lookahead.max_timestep, "must be at least 1"),
        ("lookahead.lcm_scale.every", config.lookahead.lcm_scale.every >= 1, "must be at least 1"),
        ("lookahead.lcm_scale.min", 0.0 <= config.lookahead.lcm_scale.min <= 1.0, "must be in [0, 1]"),
        ("lookahead.lcm_scale.full_prob", 0.0 <= config.lookahead.lcm_scale.full_prob <= 1.0, "must be in [0, 1]"),
        ("dropout.kv_tokens", 0.0 <= config.dropout.kv_tokens < 1.0, "must be in [0, 1)"),
        ("dropout.adapter", 0.0 <= config.dropout.adapter <= 1.0, "must be in [0, 1]"),
        ("diffusion.importance_alpha", 0.0 <= config.diffusion.importance_alpha < 1.0, "must be in [0, 1)"),
        ("lookahead.importance_alpha", 0.0 <= config.lookahead.importance_alpha < 1.0, "must be in [0, 1)"),
        ("optim.lr_encoder", config.optim.lr_encoder > 0, "must be positive"),
        ("optim.lr_adapter", config.optim.lr_adapter >= 0, "must not be negative"),
        ("optim.max_grad_norm", config.optim.max_grad_norm > 0, "must be positive"),
        ("lookahead.dreamsim_weight", config.lookahead.dreamsim_weight >= 0, "must not be negative"),
        ("checkpoint.every", config.checkpoint.every >= 1, "must be at least 1"),
        ("checkpoint.keep", config.checkpoint.keep >= 0, "must not be negative"),
        ("logging.every", config.logging.every >= 1, "must be at least 1"),
    ]  # fmt: skip
    for index, data_set in enumerate(config.data.sets):
        checks.append((f"data.sets.{index}.weight", data_set.weight > 0, "must be positive"))
    if config.lookahead.perceptual is not None:
        checks.append(("lookahead.perceptual", ":" in config.lookahead.perceptual, "expected 'package.module:factory'"))
    for key, ok, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _plain(value: Any) -> Any:
    """Tuples -> lists, so the config dumps as plain YAML/JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
