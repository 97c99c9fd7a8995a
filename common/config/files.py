"""Which options each file may hold, and reading them: YAML, ``--set`` overrides, removed options, errors.

fedseg reads three kinds of configuration, each with its own schema built
from the sections of ``common.config.schema``:

- the centre's ``federation.yaml`` (and a simulation's YAML): ``CentreFile``,
  every section but ``site``;
- a hospital's ``site.yaml``: ``SiteFile``, its ``site`` section and the two
  train options that describe its hardware (``SITE_TRAIN_KEYS``);
- the run config every site receives: ``SiteView``, what sites need of the
  centre's config and nothing else.

A key a file may not hold is refused with where it belongs; a misspelt one
with the closest valid key. What a file leaves out is unset (pydantic's
``model_fields_set``), not "equal to the default": a site.yaml that writes
``device: auto`` sets it, and it wins over the centre's ``cuda``.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model

from .checks import ConfigError
from .schema import (
    DataConfig,
    FederationConfig,
    FedsegConfig,
    ModelConfig,
    Section,
    SiteConfig,
    TrainConfig,
    section_model,
)

SITE_TRAIN_KEYS = ("device", "precision")
"""The train options a site's own site.yaml may set: its hardware differs from the other hospitals'."""

VIEW_FEDERATION_KEYS = ("wire_dtype", "rounds", "run_name", "run_id")
"""What a site needs of the centre's federation section: the wire format, the schedule's length, the run."""

CENTRE_ONLY_MODEL_KEYS = ("init_weights",)
"""Model options that name centre paths: the weights they point at reach sites as the model itself."""

_RESULTS = "docs/results.md"
_SERVER_ADAPTIVE = (
    f"FedAdam and FedYogi at the server reached 0.072 and 0.292 mean Dice: they break training ({_RESULTS})"
)

REMOVED_VALUES: dict[str, dict[Any, str]] = {
    "federation.server_optimizer": {"adam": _SERVER_ADAPTIVE, "yogi": _SERVER_ADAPTIVE},
    "train.personalize": {"all": f"fine-tuning every weight gave no gain over norm+head ({_RESULTS})"},
    "train.augmentation": {
        "scanner": "scanner-shift augmentation gave no gain over standard (0.727/0.755 against "
        f"0.741/0.760 mean Dice, {_RESULTS})"
    },
}
"""Option values measurements showed do not help: a config naming one is refused, saying why."""

REMOVED_OPTIONS: dict[str, tuple[Any, str]] = {
    "train.optimizer": ("adam", "SGD was never run; the local optimizer is Adam"),
    "train.lr_schedule": (
        "constant",
        "poly decay hurt (0.584/0.608 against 0.741/0.760 mean Dice for a constant "
        f"rate, {_RESULTS}); the learning rate is constant",
    ),
    "federation.server_lr": (0.01, f"it was FedAdam/FedYogi's step, removed: {_SERVER_ADAPTIVE}"),
    "federation.server_tau": (0.001, f"it was FedAdam/FedYogi's adaptivity, removed: {_SERVER_ADAPTIVE}"),
}
"""Options removed with their alternatives: (the value that behaves as fedseg now does, why). A config written
before the removal (a run's config.yaml) names that value and still loads; any other value is refused."""


def _subset(name: str, section: type[Section], keys: tuple[str, ...], doc: str) -> type[Section]:
    """A section holding only ``keys`` of ``section``, with the same types, defaults and descriptions."""
    fields: dict[str, Any] = {key: (section.model_fields[key].annotation, section.model_fields[key]) for key in keys}
    return create_model(name, __base__=Section, __doc__=doc, **fields)


SiteTrain = _subset("SiteTrain", TrainConfig, SITE_TRAIN_KEYS, "The train options a site.yaml may set.")
FederationView = _subset(
    "FederationView", FederationConfig, VIEW_FEDERATION_KEYS, "The federation options a site receives with the run."
)
ModelView = _subset(
    "ModelView",
    ModelConfig,
    tuple(k for k in ModelConfig.model_fields if k not in CENTRE_ONLY_MODEL_KEYS),
    "The model options a site receives with the run.",
)


CentreFile = _subset(
    "CentreFile",
    FedsegConfig,
    tuple(k for k in FedsegConfig.model_fields if k != "site"),
    "The centre's federation.yaml, or a simulation's YAML: everything but a site's own settings.",
)


class SiteFile(Section):
    """A hospital's site.yaml: who the site is, where its data lives, its own limits and hardware."""

    site: SiteConfig = Field(default_factory=SiteConfig)
    train: SiteTrain = Field(default_factory=SiteTrain)  # type: ignore[valid-type]


class SiteView(Section):
    """The part of the centre's config a site receives with the run (Flower's run config).

    It holds no centre path (runs, certificates, state, pretrained weights), no
    other site's name, no server or privacy setting: what it drops does not
    exist here. The site's resolved config (``resolved``) is a whole
    ``FedsegConfig`` for the code it shares with the centre, so there the
    centre-only options hold their defaults: site code reads only the view's.
    """

    model: ModelView = Field(default_factory=ModelView)  # type: ignore[valid-type]
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationView = Field(default_factory=FederationView)  # type: ignore[valid-type]

    @classmethod
    def of(cls, cfg: FedsegConfig) -> SiteView:
        """The view of the centre's resolved ``cfg``."""
        keep = {name: set(section_model(field).model_fields) for name, field in cls.model_fields.items()}
        return cls.model_validate(cfg.model_dump(include=keep))

    def resolved(self, site: SiteConfig, train: TrainConfig) -> FedsegConfig:
        """A site's whole config: this view with the site's own ``site`` section and ``train`` (the view's train
        options with those the site's site.yaml set, ``common.device.with_site_compute``)."""
        return _validated(FedsegConfig, {**self.model_dump(), "site": site, "train": train}, "the site's run config")


FILE_NAMES: dict[type[Section], str] = {
    CentreFile: "the centre's federation.yaml",
    SiteFile: "a site.yaml",
    SiteView: "the run config a site receives",
    FedsegConfig: "a resolved config",
}

_BELONGS = {
    "site": "a site's own settings belong in its site.yaml (in a simulation: simulation.sites.<name>.site_yaml)",
    "train": "the centre sets training for every site in federation.yaml; a site.yaml may set only "
    + ", ".join(f"train.{k}" for k in SITE_TRAIN_KEYS),
}
"""Why a key another file holds is refused here, by section; other sections are the centre's."""


def _elsewhere(dotted: str) -> str:
    """Where the option ``dotted``, refused in the file it was found in, is set instead."""
    section = dotted.split(".", 1)[0]
    centre = f"'{section}' is set by the centre, in federation.yaml, and reaches sites with the run"
    return _BELONGS.get(section, centre)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML file, turning parse errors into a message that names the file and line."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}.") from err
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}).") from err


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) on top of a raw config.

    A longer dotted key reaches into a mapping option, e.g.
    ``simulation.sites.hospital-a.held_out=true``.
    """
    if not overrides:
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping of sections, got {type(raw).__name__}.")
    merged = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.lr=0.001.")
        dotted, text = item.split("=", 1)
        *parents, key = dotted.strip().split(".")
        target = merged
        for depth, name in enumerate(parents):
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"override '{item}': '{where}' is not a mapping in the config file.")
        target[key] = yaml.safe_load(text)
    return merged


def without_removed(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """``raw`` without removed options at the value that behaves as now; a removed value or option is refused."""
    kept = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for dotted, (current, why) in REMOVED_OPTIONS.items():
        section, key = dotted.split(".")
        values = kept.get(section)
        if isinstance(values, dict) and key in values:
            if values[key] != current:
                raise ConfigError(f"{source}: {dotted} was removed: {why}. Delete it from the file.")
            del values[key]
    for dotted, removed in REMOVED_VALUES.items():
        section, key = dotted.split(".")
        values = kept.get(section)
        value = values.get(key) if isinstance(values, dict) else None
        if isinstance(value, str) and value in removed:
            raise ConfigError(f"{source}: {dotted}: '{value}' was removed: {removed[value]}.")
    return kept


def _model_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section (or nested entry) class that the error location ``loc`` points into."""
    cls: Any = schema
    parts = iter(loc)
    for part in parts:
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        cls = field.annotation
        if typing.get_origin(cls) is dict:
            cls = typing.get_args(cls)[1]
            next(parts, None)  # the mapping's own key: a site's name
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(valid)}."


def _known(loc: tuple[Any, ...]) -> bool:
    """Whether ``loc`` names an option of some file (so the file it was found in is the wrong one)."""
    parent = _model_at(FedsegConfig, loc[:-1])
    return parent is not None and loc[-1] in parent.model_fields


_KINDS = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}


def explain_error(err: ValidationError, schema: type[Section], source: str) -> str:
    """pydantic's first error as fedseg says it: the file, the dotted key, what was expected and what to do."""
    first = err.errors()[0]
    loc, kind, value = first["loc"], first["type"], first.get("input")
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return str(cause)
    dotted = ".".join(str(part) for part in loc)
    where = f"{source}: {dotted}"
    if kind == "extra_forbidden":
        if _known(loc):
            return f"{source}: '{dotted}' cannot be set in {FILE_NAMES.get(schema, 'this file')}: {_elsewhere(dotted)}."
        parent = _model_at(schema, loc[:-1])
        valid = list(parent.model_fields) if parent is not None else []
        what = "section" if len(loc) == 1 else "key"
        return f"{source}: unknown {what} '{dotted}'.{_closest(str(loc[-1]), valid)}"
    if kind == "literal_error":
        expected = str(first["ctx"]["expected"]).replace(" or ", ", ")
        return f"{where}: {value!r} is not one of {expected}."
    if kind in _KINDS:
        return f"{where}: expected {_KINDS[kind]}, got {value!r} ({type(value).__name__})."
    if kind == "list_type":
        return f"{where}: expected a list, got {value!r}."
    if kind == "dict_type":
        return f"{where}: expected a mapping of names to settings, got {value!r}."
    if kind in ("model_type", "model_attributes_type"):
        what = "section " if len(loc) == 1 else ""
        return f"{source}: {what}'{dotted}' must be a mapping, got {value!r}."
    return f"{where}: {first['msg']}."


def _validated(schema: type[Section], raw: dict[str, Any], source: str) -> Any:
    """``raw`` checked against ``schema``, with fedseg's messages for whatever pydantic refuses."""
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(explain_error(err, schema, source)) from None


def from_dict(
    raw: dict[str, Any] | None, source: str = "<config>", schema: type[Section] = FedsegConfig
) -> FedsegConfig:
    """A validated config from nested dictionaries read as ``schema``'s file; ``source`` names it in errors.

    Only what the file set is set in the result (``model_fields_set``), so a
    later layer can tell "left out" from "written as the default".
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}.")
    parsed = _validated(schema, without_removed(raw, source), source)
    if schema is FedsegConfig:
        return parsed
    return _validated(FedsegConfig, parsed.model_dump(exclude_unset=True), source)


def load_config(
    path: Path | None = None, overrides: list[str] | None = None, schema: type[Section] = FedsegConfig
) -> FedsegConfig:
    """Load a YAML file (or the defaults when ``path`` is None) read as ``schema``, then apply flag overrides.

    ``schema`` is the file's kind: ``CentreFile`` (federation.yaml), ``SiteFile``
    (site.yaml), or ``FedsegConfig`` for a resolved config fedseg wrote (a run's config.yaml).
    """
    raw = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        source += " + overrides"
    return from_dict(apply_overrides(raw, overrides or []), source, schema)


def from_yaml_text(text: str, source: str) -> FedsegConfig:
    """Parse a config that travelled as YAML text (the run config)."""
    return from_dict(yaml.safe_load(text) or {}, source)


def view_from_yaml(text: str, source: str) -> SiteView:
    """Parse a run config that must be exactly a site's view: a key the view lacks is refused."""
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}.")
    return _validated(SiteView, raw, source)
