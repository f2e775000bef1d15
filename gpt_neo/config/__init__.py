"""GPT-Neo JSON model configs -> one typed, frozen `Config`.

    schema     every key: its type, default and meaning, in five groups
    values     one JSON value against its key's type (shared with `moe_params`)
    check      the typed checker: a key/value mapping -> `Config`, and back
    rules      the checks that span keys
    load       files, `--model` names and `--set` overrides -> a checked `Config`
    moe        `moe_params` -> `MoeParams`
    rope       `rope_scaling` -> `RopeScaling`
    reference  docs/config.md, generated from the schema

Everything downstream trusts a `Config`; these names are the package's surface.
"""

from gpt_neo.config.check import Config, default_of, expand_attention_types, from_dict, to_dict
from gpt_neo.config.load import (
    REPO_ROOT,
    find_named_config,
    load_config,
    parse_overrides,
    preset_names,
    read_json_object,
    resolve_config_path,
    source_of,
)
from gpt_neo.config.rules import (
    AUTO,
    LAYOUT_KEYS,
    auto_keys,
    layer_period,
    repeating_pattern,
    require_causal,
    rotary_dims,
    scan_period,
)
from gpt_neo.config.schema import (
    ACTIVATION_FUNCTIONS,
    ALIASES,
    KNOWN_KEYS,
    NOT_NEEDED,
    REFUSED,
    SHAPE_KEYS,
    SINGLE_VALUE,
    DatasetEntry,
    shape_keys,
)

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "ALIASES",
    "AUTO",
    "KNOWN_KEYS",
    "LAYOUT_KEYS",
    "NOT_NEEDED",
    "REFUSED",
    "REPO_ROOT",
    "SHAPE_KEYS",
    "SINGLE_VALUE",
    "Config",
    "DatasetEntry",
    "auto_keys",
    "default_of",
    "expand_attention_types",
    "find_named_config",
    "from_dict",
    "layer_period",
    "load_config",
    "parse_overrides",
    "preset_names",
    "read_json_object",
    "repeating_pattern",
    "require_causal",
    "resolve_config_path",
    "rotary_dims",
    "scan_period",
    "shape_keys",
    "source_of",
    "to_dict",
]
