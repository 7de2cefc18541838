"""Training methods as step strategies with one interface: none, kd, ekd and fopro (EKD + FPG + AKD).

A method owns the trainable modules beyond the student (projector, second head, FPG, teacher head h_t),
computes its losses, and (for fopro) runs the FPG step with its own optimiser. The loop in train.py
does the student's optimisation, so every method is trained the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fopro.errors import FoproError
from fopro.fpg import FourierPromptGenerator
from fopro.losses import SupervisedLoss, balanced_softmax, cosine_distance, feature_mse
from fopro.models.student import DistillHeads, features_and_logits
from fopro.models.teacher import Teacher
from fopro.preprocess import Preprocess

METHODS = ("none", "kd", "ekd", "fopro")


@dataclass
class MethodConfig:
    name: str = "fopro"
    ekd_weight: float = 3.0  # lambda: weight of the alignment term (kd and ekd)
    adv_weight: float = 1.0  # alpha: AKD term of the FPG objective (0 turns AKD off)
    fpg_reg: float = 0.1  # beta: keeps the mask near 1
    fpg_every: int = 1
    fpg_lr: float = 1e-3
    reuse_teacher_forward: bool = True


def check_method(name: str) -> None:
    if name not in METHODS:
        raise FoproError(f"--method {name} is not known: choose one of {', '.join(METHODS)}")


class Method(nn.Module):
    """Supervised student alone (`none`); the base of the distillation methods."""

    uses_teacher = False

    def __init__(self, config: MethodConfig, student: nn.Module, student_preprocess: Preprocess, sup_loss: SupervisedLoss):
        super().__init__()
        self.config = config
        self.student = student
        self.student_preprocess = student_preprocess
        self.sup_loss = sup_loss
        # set by the training loop under torchrun: averages gradients over processes
        self.sync_gradients: Callable[[list[nn.Parameter]], None] = lambda parameters: None

    def student_parameters(self) -> list[nn.Parameter]:
        """Everything the student optimiser updates."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def trainable_state(self) -> dict[str, nn.Module]:
        """The modules whose weights a resumable training state keeps."""
        return {"student": self.student}

    def student_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return features_and_logits(self.student, self.student_preprocess(images))

    def step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The student's loss for one batch (to be back-propagated by the loop), with named parts."""
        _, logits = self.student_forward(images)
        loss = self.sup_loss(logits, labels)
        return loss, {"sup": loss.item()}


class FeatureKD(Method):
    """`kd`: MSE between the projected student feature and the teacher embedding of the plain image."""

    uses_teacher = True
    second_head = False

    def __init__(self, config: MethodConfig, student: nn.Module, student_preprocess: Preprocess, sup_loss: SupervisedLoss, teacher: Teacher):
        super().__init__(config, student, student_preprocess, sup_loss)
        self.teacher = teacher
        self.heads = DistillHeads(student.num_features, teacher.embed_dim, len(sup_loss.log_prior), second_head=self.second_head)

    def student_parameters(self) -> list[nn.Parameter]:
        return super().student_parameters() + list(self.heads.parameters())

    def trainable_state(self) -> dict[str, nn.Module]:
        return {"student": self.student, "heads": self.heads}

    def teacher_embedding(self, images: torch.Tensor, labels: torch.Tensor, projected: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            return self.teacher(images), {}

    def alignment(self, projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return feature_mse(projected, target)

    def step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        features, logits = self.student_forward(images)
        projected, second_logits = self.heads(features)
        target, parts = self.teacher_embedding(images, labels, projected, step)
        align = self.alignment(projected, target)
        sup = self.sup_loss(logits, labels)
        loss = self.config.ekd_weight * align + sup
        parts.update({"sup": sup.item(), "kd": align.item()})
        if second_logits is not None:
            sup_t = self.sup_loss(second_logits, labels)
            loss = loss + sup_t
            parts["sup_t"] = sup_t.item()
        return loss, parts


class EffectiveKD(FeatureKD):
    """`ekd`: lambda * mean(2 - 2 cos(p(f), z_t)) + L_sup(fc(f)) + L_sup(fc_t(p(f)))."""

    second_head = True

    def alignment(self, projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cosine_distance(projected, target)


class FoProKD(EffectiveKD):
    """`fopro`: EKD against the teacher's embedding of the Fourier-prompted image, with the FPG trained
    adversarially (AKD) to make the teacher's embedding discriminative (through h_t) and far from the student.
    """

    def __init__(
        self,
        config: MethodConfig,
        student: nn.Module,
        student_preprocess: Preprocess,
        sup_loss: SupervisedLoss,
        teacher: Teacher,
        fpg: FourierPromptGenerator,
    ):
        super().__init__(config, student, student_preprocess, sup_loss, teacher)
        if config.fpg_every < 1:
            raise FoproError(f"--fpg-every {config.fpg_every} must be at least 1")
        self.fpg = fpg
        self.teacher_head = nn.Linear(teacher.embed_dim, len(sup_loss.log_prior))
        self.fpg_optimizer = torch.optim.Adam(list(fpg.parameters()) + list(self.teacher_head.parameters()), lr=config.fpg_lr)

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"fpg": self.fpg_optimizer}

    def trainable_state(self) -> dict[str, nn.Module]:
        return {**super().trainable_state(), "fpg": self.fpg, "teacher_head": self.teacher_head}

    def fpg_loss(self, images: torch.Tensor, labels: torch.Tensor, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """L_fpg = L_sup(h_t(z_t(x~)), y) - alpha * mean(2 - 2 cos(p(f).detach(), z_t(x~))) + beta * mean((M - 1)^2)."""
        prompted, mask = self.fpg(images)
        embedding = self.teacher(prompted)
        explore = balanced_softmax(self.teacher_head(embedding.float()), labels, self.sup_loss.log_prior)
        adversarial = cosine_distance(projected.detach(), embedding)
        regulariser = (mask - 1).pow(2).mean()
        loss = explore - self.config.adv_weight * adversarial + self.config.fpg_reg * regulariser
        parts = {"fpg": loss.item(), "fpg_explore": explore.item(), "fpg_adv": adversarial.item(), "fpg_mask": (mask - 1).abs().mean().item()}
        return loss, embedding, parts

    def teacher_embedding(self, images: torch.Tensor, labels: torch.Tensor, projected: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Run the FPG step when due; the student's target is the teacher's embedding of the prompted image."""
        if step % self.config.fpg_every == 0:
            loss, embedding, parts = self.fpg_loss(images, labels, projected)
            self.fpg_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            parameters = list(self.fpg.parameters()) + list(self.teacher_head.parameters())
            self.sync_gradients(parameters)
            # after the sync every process sees the same gradients, so all skip a non-finite update together
            # (the loop then stops on the non-finite losses it gets back)
            if all(torch.isfinite(p.grad).all() for p in parameters if p.grad is not None):
                nn.utils.clip_grad_norm_(parameters, 5.0)
                self.fpg_optimizer.step()
            if self.config.reuse_teacher_forward:
                return embedding.detach(), parts
        else:
            parts = {}
        with torch.no_grad():
            return self.teacher(self.fpg(images)[0]), parts


def build_method(
    config: MethodConfig,
    student: nn.Module,
    student_preprocess: Preprocess,
    sup_loss: SupervisedLoss,
    teacher: Teacher | None,
    fpg: FourierPromptGenerator | None,
) -> Method:
    check_method(config.name)
    if config.name == "none":
        return Method(config, student, student_preprocess, sup_loss)
    if teacher is None:
        raise FoproError(f"--method {config.name} needs a teacher: pass --teacher")
    if config.name == "kd":
        return FeatureKD(config, student, student_preprocess, sup_loss, teacher)
    if config.name == "ekd":
        return EffectiveKD(config, student, student_preprocess, sup_loss, teacher)
    if fpg is None:
        raise FoproError("--method fopro needs the Fourier Prompt Generator")
    return FoProKD(config, student, student_preprocess, sup_loss, teacher, fpg)
