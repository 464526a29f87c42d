"""Frozen pretrained image encoders (CLIP, DINOv2) whose global features supervise tokenizers."""
from vtok.models.teachers.base import Teacher
from vtok.models.teachers.clip import load_clip_teacher
from vtok.models.teachers.dinov2 import load_dinov2_teacher

__all__ = ["Teacher", "load_clip_teacher", "load_dinov2_teacher"]
