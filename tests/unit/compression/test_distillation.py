"""Knowledge distillation's loss (dlrun.compression.distillation): the formula on hand-made logits, and the Loop's
compute_loss hook driving a student toward what the teacher says, not what the labels say."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dlrun.compression import distillation
from dlrun.core.errors import UsageError
from dlrun.data import Data, TensorSplit
from dlrun.training import evaluate, loop

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[3.0, 0.0, 1.0], [0.5, 0.5, 2.0]]
LABELS = [0, 2]


def softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def hand_kd(alpha: float, temperature: float) -> float:
    """alpha * T² * mean_i KL(p_teacher_i ‖ p_student_i) + (1 - alpha) * mean_i cross-entropy, written out."""
    kl = 0.0
    for s, t in zip(STUDENT, TEACHER, strict=True):
        p_s, p_t = softmax(s, temperature), softmax(t, temperature)
        kl += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    cross_entropy = sum(-math.log(softmax(s, 1.0)[y]) for s, y in zip(STUDENT, LABELS, strict=True))
    return alpha * temperature**2 * kl / len(STUDENT) + (1 - alpha) * cross_entropy / len(STUDENT)


@pytest.mark.parametrize(("alpha", "temperature"), [(0.7, 2.0), (1.0, 4.0), (0.0, 3.0), (0.5, 1.0)])
def test_kd_loss_is_the_formula_on_hand_made_logits(alpha, temperature):
    loss = distillation.kd_loss(
        torch.tensor(STUDENT),
        torch.tensor(TEACHER),
        torch.tensor(LABELS),
        nn.CrossEntropyLoss(),
        task="classification",
        temperature=temperature,
        alpha=alpha,
    )
    assert loss.item() == pytest.approx(hand_kd(alpha, temperature), rel=1e-6)


def test_soft_target_loss_is_zero_only_when_the_student_matches_the_teacher():
    teacher = torch.tensor(TEACHER)
    assert distillation.soft_target_loss(teacher.clone(), teacher, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    assert distillation.soft_target_loss(torch.tensor(STUDENT), teacher, 3.0).item() > 0.01


def test_regression_distills_to_the_teacher_outputs_with_mse():
    student, teacher, targets = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]]), torch.tensor([[1.0], [1.0]])
    loss = distillation.kd_loss(student, teacher, targets, nn.MSELoss(), task="regression", temperature=5.0, alpha=0.25)
    to_teacher, to_targets = (1 + 4) / 2, (0 + 1) / 2  # the temperature plays no part
    assert loss.item() == pytest.approx(0.25 * to_teacher + 0.75 * to_targets)


class Constant(nn.Module):
    """A 'teacher' that ignores its input and always gives the same outputs; dropout shows its train/eval mode."""

    def __init__(self, outputs: list[float]):
        super().__init__()
        self.outputs = nn.Parameter(torch.tensor(outputs))
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.outputs.expand(len(x), -1))


def data(task: str, num_outputs: int) -> Data:
    """Labels that the teacher contradicts: the sign of the first feature (classes 0/1) or 0.0 (regression)."""
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        x = torch.randn(n, 4, generator=generator)
        y = (x[:, 0] > 0).long() if task == "classification" else torch.zeros(n, 1)
        return TensorSplit(x, y)

    return Data(task=task, input_shape=(4,), num_outputs=num_outputs, train=split(64), val=split(16), test=split(32))


def distill_into_a_linear_student(task: str, teacher: nn.Module, num_outputs: int, *, alpha: float) -> nn.Module:
    torch.manual_seed(0)
    student = nn.Linear(4, num_outputs)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    task_loss = evaluate.loss_function(task)
    kd = distillation.distillation_loss(teacher, task_loss, task=task, temperature=2.0, alpha=alpha)
    fit = loop.Loop(
        student,
        data(task, num_outputs),
        optimizer,
        scheduler,
        task_loss,
        loop.FitConfig(epochs=15, batch_size=16, seed=0),
        compute_loss=kd,
    )
    fit.fit()
    return student.eval()


def test_alpha_1_drives_the_student_to_the_teachers_argmax_not_the_labels():
    teacher = Constant([0.0, 0.0, 0.0, 4.0])  # always class 3; the labels are only ever 0 or 1
    student = distill_into_a_linear_student("classification", teacher, 4, alpha=1.0)
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (student(x).argmax(1) == 3).all()
    # Frozen: eval mode (its dropout off) and never a gradient.
    assert not teacher.training and teacher.outputs.grad is None


def test_alpha_0_ignores_the_teacher_and_learns_the_labels():
    student = distill_into_a_linear_student("classification", Constant([0.0, 0.0, 0.0, 4.0]), 4, alpha=0.0)
    split = data("classification", 4).test
    with torch.no_grad():
        assert (student(split.x).argmax(1) == split.y).float().mean() > 0.9


def test_regression_student_regresses_onto_the_teacher():
    student = distill_into_a_linear_student("regression", Constant([5.0]), 1, alpha=1.0)  # labels are all 0.0
    with torch.no_grad():
        outputs = student(torch.randn(100, 4, generator=torch.Generator().manual_seed(1)))
    assert outputs.mean().item() == pytest.approx(5.0, abs=0.3)


@pytest.mark.parametrize(
    ("teacher", "student", "message"),
    [
        (("classification", 10), ("classification", 5), "has 10 classes, the student 5"),
        (("regression", 1), ("classification", 1), "solves regression, the student classification"),
        (("regression", 1), ("regression", 3), "has 1 outputs, the student 3"),
    ],
)
def test_a_student_must_learn_the_teachers_task_and_outputs(teacher, student, message):
    with pytest.raises(UsageError, match=message):
        distillation.check_compatible(teacher, student, "outputs/train/t")
    distillation.check_compatible(teacher, teacher, "outputs/train/t")  # the same task and outputs pass
