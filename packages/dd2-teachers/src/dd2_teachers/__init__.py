"""dd2-teachers: AR teachers for DD2 (LlamaGen, VAR, and an enumerable toy), implementing dd2_core.Teacher."""

from dd2_teachers.llamagen import LlamaGenTeacher, LlamaGenTeacherConfig, llamagen_teacher_config
from dd2_teachers.registry import load_teacher
from dd2_teachers.toy import ToyTeacher, ToyTeacherConfig
from dd2_teachers.var import VARTeacher, VARTeacherConfig, var_teacher_config

__version__ = "0.1.0"

__all__ = [
    "LlamaGenTeacher",
    "LlamaGenTeacherConfig",
    "ToyTeacher",
    "ToyTeacherConfig",
    "VARTeacher",
    "VARTeacherConfig",
    "llamagen_teacher_config",
    "load_teacher",
    "var_teacher_config",
]
