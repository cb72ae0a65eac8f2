"""dd2-core: the maths, models and inference pipeline of Distilled Decoding 2 (arXiv 2510.21003)."""

from dd2_core.backbone import Backbone, BackboneConfig, TransformerBackbone
from dd2_core.diffusion import ARDiffusion
from dd2_core.errors import CheckpointError, DD2Error, DD2ValueError
from dd2_core.flow import FlowConfig
from dd2_core.generator import OneStepGenerator
from dd2_core.heads import HeadConfig, VelocityHead
from dd2_core.logits import SamplingPolicy, policy_log_probs
from dd2_core.scores import teacher_score, teacher_velocity, teacher_x0_hat
from dd2_core.teacher import Teacher

__version__ = "0.1.0"

__all__ = [
    "ARDiffusion",
    "Backbone",
    "BackboneConfig",
    "CheckpointError",
    "DD2Error",
    "DD2ValueError",
    "FlowConfig",
    "HeadConfig",
    "OneStepGenerator",
    "SamplingPolicy",
    "Teacher",
    "TransformerBackbone",
    "VelocityHead",
    "policy_log_probs",
    "teacher_score",
    "teacher_velocity",
    "teacher_x0_hat",
]
