"""Knowledge distillation (Hinton et al., 2015): a small student learns from a trained teacher's outputs.

Classification: alpha * T² * KL(softmax(t/T) ‖ softmax(s/T)) + (1 - alpha) * task loss, with s and t the student's
and the teacher's logits and T the temperature. The KL is Hinton's direction: the teacher's softened distribution
is the target the student's is measured against (F.kl_div with the student's log-probabilities as input).
Regression has no distribution to soften: the student regresses onto the teacher's outputs,
alpha * MSE(s, t) + (1 - alpha) * task loss.

`distillation_loss` packages this as the training loop's `compute_loss(model, x, y)` hook (dlrun.training.loop).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dlrun.core.errors import UsageError

if TYPE_CHECKING:
    from dlrun.training.loop import ComputeLoss


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² * KL(softmax(teacher/T) ‖ softmax(student/T)), summed over classes and averaged over the batch.

    Soft-target gradients shrink as 1/T²; the T² factor keeps them on the task loss's scale at any temperature.
    """
    student_log_p = F.log_softmax(student / temperature, dim=1)
    teacher_log_p = F.log_softmax(teacher / temperature, dim=1)
    kl = F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)
    return kl * temperature**2


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    task_loss: nn.Module,
    *,
    task: str,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * (the teacher's term) + (1 - alpha) * task_loss(student, targets); see the module docstring."""
    if task == "classification":
        distilled = soft_target_loss(student, teacher, temperature)
    else:
        distilled = F.mse_loss(student, teacher)
    return alpha * distilled + (1 - alpha) * task_loss(student, targets)


def distillation_loss(
    teacher: nn.Module, task_loss: nn.Module, *, task: str, temperature: float, alpha: float
) -> ComputeLoss:
    """The Loop's compute_loss: the student's KD loss against a frozen teacher (eval mode, no gradients).

    The teacher sees the same (augmented) batch as the student, so its targets are computed per step.
    """
    teacher.eval()  # the loop switches only the student to train mode: the teacher's dropout and BN stay fixed
    teacher.requires_grad_(False)

    def compute_loss(student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_out = teacher(x).float()
        return kd_loss(student(x).float(), teacher_out, y, task_loss, task=task, temperature=temperature, alpha=alpha)

    return compute_loss


def check_compatible(teacher: tuple[str, int], student: tuple[str, int], teacher_label: str) -> None:
    """A student learns the teacher's task and outputs: (task, number of outputs) of each must agree."""
    (teacher_task, teacher_outputs), (student_task, student_outputs) = teacher, student
    if teacher_task != student_task:
        raise UsageError(
            f"the teacher {teacher_label} solves {teacher_task}, the student {student_task}: distill within one task"
        )
    if teacher_outputs != student_outputs:
        what = "classes" if teacher_task == "classification" else "outputs"
        raise UsageError(
            f"the teacher {teacher_label} has {teacher_outputs} {what}, the student {student_outputs}: "
            f"a student learns the teacher's {what}"
        )
