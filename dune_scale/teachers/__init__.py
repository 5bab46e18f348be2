"""The frozen DUNE teachers: registry, official-checkpoint loaders, and the ensemble."""

from dune_scale.teachers.build import build_teacher, convert_teacher
from dune_scale.teachers.checkpoints import TeacherCheckpointError
from dune_scale.teachers.ensemble import TeacherEnsemble, align_images, build_teacher_ensemble
from dune_scale.teachers.registry import TEACHER_SPECS, TeacherSpec, get_teacher_spec

__all__ = [
    "TEACHER_SPECS",
    "TeacherCheckpointError",
    "TeacherEnsemble",
    "TeacherSpec",
    "align_images",
    "build_teacher",
    "build_teacher_ensemble",
    "convert_teacher",
    "get_teacher_spec",
]
