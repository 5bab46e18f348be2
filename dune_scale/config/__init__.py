"""Typed configuration tree: YAML recipes + ``a.b=c`` overrides, validated before any work starts.

Every field is a dataclass attribute with a type; loading rejects unknown keys, wrong types and
impossible values with one :class:`ConfigError` that names the key, the value and what is allowed.
A recipe may start from another one with ``base: other.yaml`` (next to the recipe, else a shipped
recipe). A layer that names ``student.arch`` brings that architecture's shape: the custom
``embed_dim``/``depth``/``num_heads`` of the layers below it (a base recipe, the recipe under
command-line overrides, the top level under a ``students:`` entry) are dropped.

By concern: :mod:`.sections` (the dataclasses and their field rules), :mod:`.typed` (plain mappings
→ sections, merging layers), :mod:`.validation` (rules across fields), :mod:`.loading` (files and
overrides). Everything is importable from ``dune_scale.config``.
"""

from dune_scale.config.loading import config_from_dict, load_config, recipe_path, save_config
from dune_scale.config.sections import (
    ARCH_SHAPE_KEYS,
    SHARED_STUDENT_KEYS,
    STUDENT_SECTIONS,
    STUDENTS_FOLDER,
    TOKEN_TYPES,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    EvalConfig,
    LossConfig,
    OptimConfig,
    ProjectorConfig,
    RunConfig,
    StrategyConfig,
    StudentConfig,
    StudentEntry,
    TeacherConfig,
    TeachersConfig,
    TrainConfig,
    student_subdir,
)
from dune_scale.config.typed import deep_merge, merge_layer, resolve_student_dicts, student_configs
from dune_scale.config.validation import parse_step_range, validate

__all__ = [
    "ARCH_SHAPE_KEYS", "SHARED_STUDENT_KEYS", "STUDENT_SECTIONS", "STUDENTS_FOLDER", "TOKEN_TYPES",
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistillConfig", "EvalConfig", "LossConfig",
    "OptimConfig", "ProjectorConfig", "RunConfig", "StrategyConfig", "StudentConfig", "StudentEntry",
    "TeacherConfig", "TeachersConfig", "TrainConfig",
    "config_from_dict", "deep_merge", "load_config", "merge_layer", "parse_step_range", "recipe_path",
    "resolve_student_dicts", "save_config", "student_configs", "student_subdir", "validate",
]
