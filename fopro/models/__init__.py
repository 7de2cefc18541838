"""Teacher (frozen embeddings), student (timm classifier + distillation heads), weight loading."""

from fopro.preprocess import Preprocess
from fopro.models.heads import DistillHeads
from fopro.models.student import StudentOptions, create_student, features_and_logits
from fopro.models.teacher import Teacher, TeacherOptions, load_teacher

__all__ = [
    "DistillHeads",
    "Preprocess",
    "StudentOptions",
    "Teacher",
    "TeacherOptions",
    "create_student",
    "features_and_logits",
    "load_teacher",
]
