"""fedseg's configuration: the schema (``schema``), the checks across options (``checks``) and the files that
set them (``files``: the centre's federation.yaml, a site's site.yaml, the view a site receives).

Every option lives in ``schema`` once, with its type, default and one-line
description; docs/configuration.md is generated from it (``common.config_docs``).
"""

from .checks import RUN_ID, SITE_NAME, ConfigError, check_consistency
from .files import (
    FILE_NAMES,
    REMOVED_OPTIONS,
    REMOVED_VALUES,
    SITE_TRAIN_KEYS,
    CentreFile,
    SiteFile,
    SiteView,
    apply_overrides,
    from_dict,
    from_yaml_text,
    load_config,
    read_yaml,
    view_from_yaml,
)
from .schema import (
    NORM_TRAVEL,
    Augmentation,
    DataConfig,
    FederationConfig,
    FedsegConfig,
    ModelConfig,
    NormMode,
    PrivacyConfig,
    Section,
    ServerConfig,
    SimulatedSite,
    SimulationConfig,
    SiteConfig,
    TrainConfig,
    describe_options,
    option,
    with_channels,
)

__all__ = [
    "FILE_NAMES",
    "NORM_TRAVEL",
    "REMOVED_OPTIONS",
    "REMOVED_VALUES",
    "RUN_ID",
    "SITE_NAME",
    "SITE_TRAIN_KEYS",
    "Augmentation",
    "CentreFile",
    "ConfigError",
    "DataConfig",
    "FederationConfig",
    "FedsegConfig",
    "ModelConfig",
    "NormMode",
    "PrivacyConfig",
    "Section",
    "ServerConfig",
    "SimulatedSite",
    "SimulationConfig",
    "SiteConfig",
    "SiteFile",
    "SiteView",
    "TrainConfig",
    "apply_overrides",
    "check_consistency",
    "describe_options",
    "from_dict",
    "from_yaml_text",
    "load_config",
    "option",
    "read_yaml",
    "view_from_yaml",
    "with_channels",
]
