"""The distillation methods, one registry entry each: which loss terms a method switches on.

    L = (1 - alpha) CE + alpha T^2 KL                  (kd)
        + beta L_exp(head map, E_T)                    (head; xd_e2kd_own: E_T -> sg(the student's own map))
        + at_weight AT(A_S, A_T)                       (attention)
        + e2kd_weight L_e2kd(GradCAM_S, E_T)           (e2kd: the student's own map; distill.e2kd_loss)
        + honesty_weight L_e2kd(GradCAM_S, sg(m))      (head and e2kd: the own map pulled to the head's m)
        (e2kd_grad: the student's own gradient map, input x gradient or |gradient|, for IG/saliency teachers)

A method is only a set of switches over the same joint loss (``losses.distillation_loss``),
so every baseline runs in the same harness with the same seeds and data. Adding a method is
adding one entry here: config choices, CLI choices and docs are read from ``METHODS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The teacher explainers whose map a student can reproduce differentiably from its input gradient
# (losses.differentiable_gradient_map); Grad-CAM teachers use the student's own Grad-CAM instead.
GRADIENT_MAP_EXPLAINERS = ("integrated_gradients", "saliency")


@dataclass(frozen=True)
class Method:
    """Which terms of the joint loss are on; their weights come from the ``distill`` config."""

    description: str
    kd: bool = False  # Hinton KD on the teacher's cached logits (weight distill.alpha)
    head: bool = False  # explanation head trained on the teacher's cached maps (weight distill.beta)
    attention: bool = False  # attention transfer on the live teacher's features (weight distill.at_weight)
    e2kd: bool = False  # the student's own map pulled to the teacher's cached map (weight distill.e2kd_weight)
    # Which map of its own: its Grad-CAM (last conv block), or its input-gradient map made like the
    # teacher's (needs explain.explainer in GRADIENT_MAP_EXPLAINERS).
    student_map: Literal["gradcam", "gradient"] = "gradcam"
    # What the head learns to draw: the teacher's cached map, or the student's own map of this step
    # (detached: the head follows the classifier, not the reverse), which e2KD pulls to the teacher's.
    head_target: Literal["teacher", "own"] = "teacher"

    def __post_init__(self) -> None:
        if self.head_target == "own" and not (self.head and self.e2kd):
            raise ValueError("head_target='own' needs a head and the e2kd term (which computes the student's own map)")

    @property
    def needs_teacher(self) -> bool:
        """Only feature-level terms need the teacher network during training; logits and maps are cached."""
        return self.attention

    def loss_weights(
        self, alpha: float, beta: float, at_weight: float, e2kd_weight: float, honesty_weight: float = 0.0
    ) -> dict[str, float]:
        """The weights ``distillation_loss`` takes: a term that is off gets weight 0. The honesty
        term needs both maps it compares: the head's and the student's own (e2kd's)."""
        return {
            "alpha": alpha if self.kd else 0.0,
            "beta": beta if self.head else 0.0,
            "at_weight": at_weight if self.attention else 0.0,
            "e2kd_weight": e2kd_weight if self.e2kd else 0.0,
            "honesty_weight": honesty_weight if self.head and self.e2kd else 0.0,
        }


METHODS: dict[str, Method] = {
    "student": Method("the student alone, cross-entropy on the labels"),
    "kd": Method("Hinton knowledge distillation (CE + temperature-softened KL)", kd=True),
    "at": Method("KD plus attention transfer (Zagoruyko & Komodakis 2017)", kd=True, attention=True),
    "xd": Method("XDistillation: KD plus an explanation head fused into the classifier", kd=True, head=True),
    "e2kd": Method(
        "KD plus the student's own Grad-CAM matched to the teacher's map (Parchami et al. 2024)", kd=True, e2kd=True
    ),
    "e2kd_grad": Method(
        "KD plus the student's own gradient map (input x gradient for an IG teacher, |gradient| for saliency) "
        "matched to the teacher's: e2KD for pixel-attribution explainers",
        kd=True,
        e2kd=True,
        student_map="gradient",
    ),
    "xd_e2kd": Method(
        "XD and e2KD together: the head and the student's own map both pulled to the teacher's",
        kd=True,
        head=True,
        e2kd=True,
    ),
    "xd_e2kd_own": Method(
        "xd_e2kd with the head trained on the student's own map (detached) instead of the teacher's: "
        "a one-pass copy of the student's reason, pulled to the teacher's by e2KD",
        kd=True,
        head=True,
        e2kd=True,
        head_target="own",
    ),
}
