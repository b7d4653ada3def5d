"""The configuration: a TOML file validated into frozen dataclasses (schema.py), every mistake
reported with file, key and value (load.py). docs/configuration.md is the reference."""

from proxy.config.load import (  # noqa: F401 - the package's public face
    ConfigError, build_config, check_config_main, load_config, parse_config, write_config,
)
from proxy.config.schema import Config  # noqa: F401
