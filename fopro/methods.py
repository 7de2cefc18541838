"""Training methods as step strategies with one interface: none, kd, ekd and fopro (EKD + FPG + AKD).

A method owns the trainable modules beyond the student (projector, second head, FPG, teacher head h_t),
computes its losses, and (for fopro) runs the FPG step with its own optimiser. The loop in train.py
does the student's optimisation, so every method is trained the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fopro.errors import FoproError
from fopro.fpg import FourierPromptGenerator
from fopro.data.manifest import UNLABELED
from fopro.losses import (
    SupervisedLoss, balanced_softmax, class_balanced_weights, cosine_distances, focus_weights, squared_errors, weighted_mean,
)
from fopro.models.heads import DistillHeads, ProjectedStudent, projected_state
from fopro.models.student import features_and_logits
from fopro.models.teacher import Teacher
from fopro.models.weights import embedding_dim
from fopro.preprocess import Preprocess

Losses = dict[str, torch.Tensor]  # named parts of a step's losses, detached (0-d tensors)
FPG_GRAD_CLIP = 5.0  # the FPG's and h_t's gradients are clipped separately (h_t's would dominate a joint norm)
# --align-focus when not given: chosen on val for ekd (README, "The method in fopro"); level on val with fopro's FPG
# and not measured for kd, so 0 there
DEFAULT_ALIGN_FOCUS = {"ekd": 2.0}


@dataclass
class MethodConfig:
    name: str = "ekd"
    ekd_weight: float = 3.0  # lambda: weight of the alignment term (kd and ekd)
    adv_weight: float = 1.0  # alpha: AKD term of the FPG objective (0 turns AKD off)
    fpg_reg: float = 0.1  # beta: keeps the mask near 1
    fpg_every: int = 1
    fpg_lr: float = 1e-3
    prompt_fraction: float = 1.0  # share of each batch that the FPG prompts (fopro)
    probe_kd: float = 0.0  # weight of KL(teacher probe || student) on the teacher's embedding (kd, ekd, fopro)
    align_weights: str = "none"  # none | balanced: each image's alignment term weighted 1 / (C p_y) (kd, ekd, fopro)
    align_focus: float = 0.0  # gamma: each image's alignment term also weighted d_i^gamma / mean(d^gamma) (kd, ekd, fopro)
    second_head: bool = True  # EKD's fc_t on the projection (ekd, fopro); False keeps only the alignment term
    deploy_head: str = "fc"  # the classifier the checkpoints keep: fc(f), or fc_t(p(f)) (ekd, fopro with the second head)


def default_align_focus(method: str) -> float:
    """gamma of --align-focus when the option is not given."""
    return DEFAULT_ALIGN_FOCUS.get(method, 0.0)


def check_method(name: str) -> None:
    if name not in METHODS:
        raise FoproError(f"--method {name} is not known: choose one of {', '.join(METHODS)}")


class Method(nn.Module):
    """Supervised student alone (`none`); the base of the distillation methods."""

    uses_teacher = False
    uses_fpg = False
    second_head = False  # EKD's fc_t(p(f)) (ekd, fopro)

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

    def set_schedule(self, lr_factor: float, adversary_factor: float) -> None:
        """Where the run is: the factor of the learning-rate schedule and of the adversary's ramp (fopro)."""

    def trainable_state(self) -> dict[str, nn.Module]:
        """The modules whose weights a resumable training state keeps."""
        return {"student": self.student}

    def student_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return features_and_logits(self.student, self.student_preprocess(images))

    def deployed(self) -> nn.Module:
        """The student as its checkpoints keep it (validation scores this module)."""
        return self.student

    def deployed_state(self) -> dict[str, torch.Tensor]:
        """The state dict of the checkpoints (a timm model's; see fopro.models.heads for head fc_t)."""
        return self.student.state_dict()

    def step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, Losses]:
        """The student's loss for one batch (to be back-propagated by the loop), with named parts: detached tensors,
        which the loop turns into numbers once per logging interval (no host synchronisation per term and step)."""
        _, logits = self.student_forward(images)
        loss = self.sup_loss(logits, labels)
        return loss, {"sup": loss.detach()}


class FeatureKD(Method):
    """`kd`: MSE between the projected student feature and the teacher embedding of the plain image."""

    uses_teacher = True

    def __init__(
        self,
        config: MethodConfig,
        student: nn.Module,
        student_preprocess: Preprocess,
        sup_loss: SupervisedLoss,
        teacher: Teacher,
        probe: nn.Module | None = None,
    ):
        super().__init__(config, student, student_preprocess, sup_loss)
        if config.probe_kd > 0 and probe is None:
            raise FoproError("--probe-kd needs the teacher probe (a linear classifier on the teacher's embeddings)")
        self.teacher = teacher
        self.probe = probe.requires_grad_(False).eval() if probe is not None else None
        self.heads = DistillHeads(
            embedding_dim(student), teacher.embed_dim, len(sup_loss.log_prior), second_head=self.second_head and config.second_head
        )

    def student_parameters(self) -> list[nn.Parameter]:
        return super().student_parameters() + list(self.heads.parameters())

    def deployed(self) -> nn.Module:
        return ProjectedStudent(self.student, self.heads) if self.config.deploy_head == "fc_t" else self.student

    def deployed_state(self) -> dict[str, torch.Tensor]:
        return projected_state(self.student, self.heads) if self.config.deploy_head == "fc_t" else self.student.state_dict()

    def trainable_state(self) -> dict[str, nn.Module]:
        return {"student": self.student, "heads": self.heads}

    def distances(self, projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image alignment distance between p(f) and the teacher's embedding."""
        return squared_errors(projected, target)

    def alignment(self, projected: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        distances = self.distances(projected, target)
        return weighted_mean(distances, self.alignment_weights(labels, distances))

    def alignment_weights(self, labels: torch.Tensor, distances: torch.Tensor) -> torch.Tensor | None:
        """--align-weights balanced (1 / (C p_y)) times --align-focus (d_i^gamma / mean(d^gamma)); None: all equal."""
        weights = class_balanced_weights(self.sup_loss.log_prior, labels) if self.config.align_weights == "balanced" else None
        if self.config.align_focus > 0:
            focus = focus_weights(distances, self.config.align_focus)
            weights = focus if weights is None else weights * focus
        return weights

    def step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, Losses]:
        features, logits = self.student_forward(images)
        projected, second_logits = self.heads(features)
        with torch.no_grad():
            target = self.teacher(images)
        return self.student_loss(logits, projected, second_logits, target, labels, {})

    def student_loss(
        self,
        logits: torch.Tensor,
        projected: torch.Tensor,
        second_logits: torch.Tensor | None,
        target: torch.Tensor,
        labels: torch.Tensor,
        parts: Losses,
    ) -> tuple[torch.Tensor, Losses]:
        """L_sup(fc(f)) + lambda * alignment(p(f), target) [+ L_sup(fc_t(p(f))) with the second head]; the
        alignment is the (weighted) mean of the per-image distances."""
        align = self.alignment(projected, target, labels)
        sup = self.sup_loss(logits, labels)
        loss = self.config.ekd_weight * align + sup
        parts.update({"sup": sup.detach(), "kd": align.detach()})
        if second_logits is not None:
            sup_t = self.sup_loss(second_logits, labels)
            loss = loss + sup_t
            parts["sup_t"] = sup_t.detach()
        if self.config.probe_kd > 0:
            probe_kd = self.probe_distillation(logits, target)
            loss = loss + self.config.probe_kd * probe_kd
            parts["probe_kd"] = probe_kd.detach()
        return loss, parts

    def probe_distillation(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """KL(softmax(probe(z_t)) || softmax(fc(f))), mean over every image (unlabelled ones too): the teacher
        probe's class beliefs, balanced like the student's logits (both trained with the same loss)."""
        with torch.no_grad():
            teacher_probs = torch.softmax(self.probe(target.float()), dim=1)
        return F.kl_div(torch.log_softmax(logits.float(), dim=1), teacher_probs, reduction="batchmean")


class EffectiveKD(FeatureKD):
    """`ekd`: lambda * mean(2 - 2 cos(p(f), z_t)) + L_sup(fc(f)) + L_sup(fc_t(p(f)))."""

    second_head = True

    def distances(self, projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cosine_distances(projected, target)


@dataclass
class PromptedBatch:
    """One fopro step's tensors: the teacher's input x~ (prompted, with its graph to the FPG), the student's input
    (the same values, cut from that graph), z_t(x~), p(f(x~)), the labels, the mask M and which images were prompted."""

    inputs: torch.Tensor
    student_inputs: torch.Tensor
    embedding: torch.Tensor
    projected: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    selection: torch.Tensor | None


class FoProKD(EffectiveKD):
    """`fopro`: EKD on Fourier-prompted images, with the FPG trained adversarially (AKD).

    Each step the FPG prompts (a share ``prompt_fraction`` of) the batch, x~ = FPG(x). The student learns on
    x~: L_sup(fc(f(x~))) + L_sup(fc_t(p(f(x~)))) + lambda * mean(2 - 2 cos(p(f(x~)), z_t(x~))), so the
    adversary's images are the ones it is trained on. The FPG and the teacher head h_t then minimise
    L_fpg = L_sup(h_t(z_t(x~)), y) - alpha * mean(2 - 2 cos(p(f(x~)), z_t(x~))) + beta * mean((M - 1)^2):
    keep the teacher's embedding of x~ discriminative while making it hard for the student to match. The
    student's forward pass is shared by both objectives (its graph is cut at x~, and the FPG's gradient
    through the student is carried back to the FPG by hand), which keeps the step cheap.
    fopro's own reconstruction: the authors did not publish the FPG or AKD (see README, "The method").
    """

    uses_fpg = True

    def __init__(self, config: MethodConfig, student: nn.Module, student_preprocess: Preprocess, sup_loss: SupervisedLoss, teacher: Teacher,
                 fpg: FourierPromptGenerator, probe: nn.Module | None = None):
        super().__init__(config, student, student_preprocess, sup_loss, teacher, probe)
        if config.fpg_every < 1:
            raise FoproError(f"MethodConfig.fpg_every {config.fpg_every} must be at least 1")
        if not 0.0 < config.prompt_fraction <= 1.0:
            raise FoproError(f"MethodConfig.prompt_fraction {config.prompt_fraction} must be in (0, 1]")
        self.fpg = fpg
        self.teacher_head = nn.Linear(teacher.embed_dim, len(sup_loss.log_prior))
        self.fpg_optimizer = torch.optim.Adam(list(fpg.parameters()) + list(self.teacher_head.parameters()), lr=config.fpg_lr)
        self.adversary_factor = 1.0

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"fpg": self.fpg_optimizer}

    def trainable_state(self) -> dict[str, nn.Module]:
        return {**super().trainable_state(), "fpg": self.fpg, "teacher_head": self.teacher_head}

    def set_schedule(self, lr_factor: float, adversary_factor: float) -> None:
        for group in self.fpg_optimizer.param_groups:
            group["lr"] = self.config.fpg_lr * lr_factor
        self.adversary_factor = adversary_factor

    def prompt_selection(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Which images the FPG prompts: all (None), or the first ceil(fraction * n) of the labelled images and
        of the unlabelled ones (the loader's order is random)."""
        if self.config.prompt_fraction >= 1.0:
            return None
        selection = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
        for part in (labels != UNLABELED, labels == UNLABELED):
            indices = part.nonzero().flatten()
            selection[indices[: math.ceil(self.config.prompt_fraction * len(indices))]] = True
        return selection

    def prompted_batch(self, images: torch.Tensor, selection: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch with the selected images prompted, and the mask M."""
        if selection is None:
            return self.fpg(images)
        prompted, mask = self.fpg(images[selection])
        inputs = images.clone()
        inputs[selection] = prompted
        return inputs, mask

    def step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, Losses]:
        fpg_due = step % self.config.fpg_every == 0
        alpha = self.config.adv_weight * self.adversary_factor if fpg_due else 0.0
        selection = self.prompt_selection(labels)
        with torch.set_grad_enabled(fpg_due):
            inputs, mask = self.prompted_batch(images, selection)
            embedding = self.teacher(inputs)
        student_inputs = inputs.detach().requires_grad_(alpha > 0)
        features, logits = self.student_forward(student_inputs)
        projected, second_logits = self.heads(features)
        batch = PromptedBatch(inputs, student_inputs, embedding, projected, labels, mask, selection)
        parts = self.fpg_step(batch, alpha) if fpg_due else {}
        return self.student_loss(logits, projected, second_logits, embedding.detach(), labels, parts)

    def fpg_loss(self, batch: PromptedBatch, alpha: float) -> tuple[torch.Tensor, Losses]:
        """L_fpg = L_sup(h_t(z_t(x~)), y) - alpha * mean(2 - 2 cos(p(f(x~)), z_t(x~))) + beta * mean((M - 1)^2),
        over the prompted images (the supervised term over the labelled ones among them)."""
        embedding, projected, labels = batch.embedding, batch.projected, batch.labels
        if batch.selection is not None:
            embedding, projected, labels = embedding[batch.selection], projected[batch.selection], labels[batch.selection]
        explore = balanced_softmax(self.teacher_head(embedding.float()), labels, self.sup_loss.log_prior)
        adversarial = self.distances(projected, embedding).mean()
        regulariser = (batch.mask - 1).pow(2).mean()
        loss = explore - alpha * adversarial + self.config.fpg_reg * regulariser
        parts = {"fpg": loss, "fpg_explore": explore, "fpg_adv": adversarial, "fpg_mask": (batch.mask - 1).abs().mean()}
        return loss, {name: value.detach() for name, value in parts.items()}

    def fpg_step(self, batch: PromptedBatch, alpha: float) -> Losses:
        """One update of the FPG and h_t on L_fpg, on the warm-up + cosine schedule of the student's rate.

        The gradient that reaches x~ through the student (the adversarial term) is sent on to the FPG with a
        second backward from x~; the student's own weights get no gradient from L_fpg."""
        loss, parts = self.fpg_loss(batch, alpha)
        fpg_parameters, head_parameters = list(self.fpg.parameters()), list(self.teacher_head.parameters())
        self.fpg_optimizer.zero_grad(set_to_none=True)
        through_student = [batch.student_inputs] if batch.student_inputs.requires_grad else []
        grads = torch.autograd.grad(loss, fpg_parameters + head_parameters + through_student, retain_graph=True, allow_unused=True)
        for parameter, grad in zip(fpg_parameters + head_parameters, grads):
            parameter.grad = grad
        if through_student:
            torch.autograd.backward(batch.inputs, grad_tensors=grads[-1], inputs=fpg_parameters)
        self.sync_gradients(fpg_parameters + head_parameters)
        # after the sync every process sees the same gradients, so all skip a non-finite update together
        # (the loop then stops on the non-finite losses it gets back)
        if all(torch.isfinite(p.grad).all() for p in fpg_parameters + head_parameters if p.grad is not None):
            nn.utils.clip_grad_norm_(fpg_parameters, FPG_GRAD_CLIP)
            nn.utils.clip_grad_norm_(head_parameters, FPG_GRAD_CLIP)
            self.fpg_optimizer.step()
        return parts


METHOD_CLASSES: dict[str, type[Method]] = {"none": Method, "kd": FeatureKD, "ekd": EffectiveKD, "fopro": FoProKD}
METHODS = tuple(METHOD_CLASSES)  # the valid --method values


def trains_second_head(name: str, second_head: bool = True) -> bool:
    """Whether --method NAME trains EKD's fc_t(p(f)) (ekd, fopro; not with --no-second-head): what --deploy-head fc_t keeps."""
    return METHOD_CLASSES[name].second_head and second_head if name in METHOD_CLASSES else False


def build_method(
    config: MethodConfig,
    student: nn.Module,
    student_preprocess: Preprocess,
    sup_loss: SupervisedLoss,
    teacher: Teacher | None,
    fpg: FourierPromptGenerator | None,
    probe: nn.Module | None = None,
) -> Method:
    """The method class named by config.name, given the parts it needs (a teacher for kd / ekd / fopro, an FPG for fopro)."""
    check_method(config.name)
    cls = METHOD_CLASSES[config.name]
    if config.deploy_head == "fc_t" and not trains_second_head(config.name, config.second_head):
        raise FoproError(f"deploy head fc_t needs EKD's second head, which --method {config.name} has not here: use --method ekd or fopro with it, or --deploy-head fc")
    if not cls.uses_teacher:
        return cls(config, student, student_preprocess, sup_loss)
    if teacher is None:
        raise FoproError(f"--method {config.name} needs a teacher: pass --teacher")
    if not cls.uses_fpg:
        return cls(config, student, student_preprocess, sup_loss, teacher, probe)
    if fpg is None:
        raise FoproError(f"--method {config.name} needs the Fourier Prompt Generator")
    return cls(config, student, student_preprocess, sup_loss, teacher, fpg, probe)
