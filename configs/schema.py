"""Typed configs: the pieces every job's config dataclass uses (torch-free, fast to import).

Each job's settings are a dataclass beside the code it configures (``policies/config.py:TrainConfig``,
``sim/collect.py:CollectConfig``, ...), registered with hydra's ConfigStore as ``base_<job>``; the job's
YAML (``configs/<job>.yaml``) lists it first in its defaults and holds only what differs. Policy kinds
work the same way in the ``policy`` group (``policies/models/configs.py``).

- ``register(node, name, group=None)``: store a dataclass in hydra's ConfigStore.
- ``typed(cfg)``: a composed (structured) DictConfig -> the dataclass instances it describes, nested,
  so every ``__post_init__`` runs; a problem becomes a ``ConfigError`` whose key is the full dotted path.
- ``ConfigError(key, problem)``: a bad setting; ``str(err)`` is ``"<key>: <problem>"``.
- ``error_line(err)``: one line for any config error (hydra composition, omegaconf, ConfigError).
- ``TaskConfig``: the ``task`` group (configs/task/*.yaml), shared by every job that runs or learns a task.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

MISSING = "???"  # omegaconf's MISSING: a value the config must be given


class ConfigError(ValueError):
    """A bad setting: ``key`` is its dotted path (``policy.horizon``), ``problem`` says what is wrong with the value."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}" if key else problem)

    def under(self, prefix: str) -> ConfigError:
        """The same error for a setting nested at ``prefix`` (``policy`` + ``horizon`` -> ``policy.horizon``)."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.problem)


def unset(value: Any) -> bool:
    """True for a value not given yet: MISSING or one with an interpolation not resolved yet (``${task}``)."""
    return isinstance(value, str) and (value == MISSING or "${" in value)


def check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def check_choice(value: Any, choices, key: str) -> None:
    check(value in choices, key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_int(value: Any, key: str, low: int | None = None, none_ok: bool = False) -> None:
    if none_ok and value is None:
        return
    check(
        isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low),
        key,
        f"must be an integer{'' if low is None else f' >= {low}'}, got {value!r}",
    )


def check_number(
    value: Any,
    key: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = ""
        if low is not None and high is not None:
            bounds = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            bounds = f" {'>' if low_open else '>='} {low}"
        elif high is not None:
            bounds = f" {'<' if high_open else '<='} {high}"
        raise ConfigError(key, f"must be a number{bounds}, got {value!r}")


# =========================================================================================== shared nodes
@dataclass
class TaskConfig:
    """A task (configs/task/<name>.yaml): the env to build and what a policy observes of it."""

    name: str = MISSING
    max_steps: int = MISSING  # control steps per episode
    env: dict[str, Any] = field(default_factory=dict)  # extra env constructor kwargs (sim/tasks)
    # Low-dim observation keys a policy is trained on (the goal is always given separately).
    obs_keys: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not unset(self.max_steps):
            check_int(self.max_steps, "max_steps", 1)


# =========================================================================================== registration
def register(node: type, name: str, group: str | None = None) -> None:
    """Store dataclass ``node`` in hydra's ConfigStore (``group/name``); storing it again replaces it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=node, group=group)


def register_job(job: str, node: type) -> None:
    """A job's config dataclass, as ``base_<job>`` (the first entry of configs/<job>.yaml's defaults)."""
    register(node, f"base_{job}")


# =========================================================================================== typed
def typed(cfg: Any, prefix: str = "") -> Any:
    """The objects a composed config describes: structured nodes become their dataclasses (nested ones
    first, so each ``__post_init__`` sees built values), other containers plain dicts and lists,
    interpolations resolved. Raises ConfigError naming the full key of a missing or rejected value."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, ListConfig):
        return [typed(cfg[i], f"{prefix}[{i}]" if prefix else f"[{i}]") for i in range(len(cfg))]
    if not isinstance(cfg, DictConfig):
        return cfg
    values = {}
    for key in cfg:
        path = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(path, f"missing: give {path}=...")
        values[str(key)] = typed(cfg[key], path)
    cls = OmegaConf.get_type(cfg)
    if cls is None or not dataclasses.is_dataclass(cls):
        return values
    init = {f.name for f in dataclasses.fields(cls) if f.init}
    try:
        return cls(**{key: value for key, value in values.items() if key in init})
    except ConfigError as err:
        raise err.under(prefix) from None
    except (ValueError, TypeError) as err:  # a dataclass whose checks raise plain ValueErrors
        raise named_error(str(err), cls, prefix) from None


def named_error(message: str, cls: type, prefix: str = "") -> ConfigError:
    """A ConfigError for a plain error message of dataclass ``cls`` (at ``prefix``); a leading setting name
    ("port must be ...", "allocation.rule: unknown ...") becomes its key."""
    first = message.split(maxsplit=1)
    names = {f.name for f in dataclasses.fields(cls)}
    key = first[0].rstrip(":") if first else ""
    if len(first) == 2 and key.split(".")[0].split("[")[0] in names:
        return ConfigError(key, first[1]).under(prefix)
    return ConfigError(prefix, message)


# =========================================================================================== errors
def config_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "a bad config" (reported in one line by the `flotilla` command)."""
    from hydra.errors import ConfigCompositionException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    return (ConfigError, ConfigCompositionException, OverrideParseException, OmegaConfBaseException)


def error_line(err: BaseException) -> str:
    """``<key>: <problem>`` (or the problem alone when no key is known) for a config error, on one line."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, ConfigError):
        return _one_line(str(err))
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, option = err.missing_cfg_file.rsplit("/", 1)
        options = f"; options: {', '.join(err.options)}" if err.options else ""
        return f"{group}: no config {option!r} (configs/{err.missing_cfg_file}.yaml){options}"
    if isinstance(err, OverrideParseException):
        return f"cannot parse the override: {_one_line(str(err))}"
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        problem = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
        if "not in struct" in problem:
            # A map setting (import's cameras, keys) takes new entries only with hydra's `+`.
            is_map = getattr(cause, "object_type", None) is dict
            problem = f"no such entry: add one with +{cause.full_key}=VALUE" if is_map else "no such setting"
        return f"{cause.full_key}: {problem}"
    return _one_line(str(err))


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[0]
