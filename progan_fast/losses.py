"""GAN losses, computed from D's raw outputs (logits) so every log-sigmoid is numerically stable.

With ``D(x) = sigmoid(l)``: ``log D(x) = -softplus(-l)`` and ``log(1 - D(x)) = -softplus(l)``.

- ``nonsat`` (default; the seeds' training procedure):
  ``L_D = -(E[log D(x)] + E[log(1 - D(G(z)))])`` and the non-saturating ``L_G' = -E[log D(G(z))]``.
- ``minimax``: the same ``L_D`` with the original saturating ``L_G = E[log(1 - D(G(z)))]``.
- ``wgan-gp`` (ProGAN paper, appendix A.1; official defaults):
  ``L_D = E[D(G(z))] - E[D(x)] + lambda * E[(||grad D(x_hat)|| - 1)^2] + drift * E[D(x)^2]`` with
  ``x_hat`` a per-sample uniform mix of real and fake, ``lambda = 10``, ``drift = 0.001``;
  ``L_G = -E[D(G(z))]``.

Expectations are batch means. The functions take logits and return scalar tensors; the
gradient-penalty helper takes D itself because it differentiates through it.

Class-conditional runs (AC-GAN, as the official ``D_wgangp_acgan``/``G_wgan_acgan`` do it, here for
every loss): D's output is ``[N, 1 + C]``, the score then the class logits. D's loss adds
``cond_weight * (CE(D_cls(x), y_real) + CE(D_cls(G(z, y)), y))`` and G's adds
``cond_weight * CE(D_cls(G(z, y)), y)``, with CE the softmax cross-entropy (batch mean) and ``y``
the labels given to G; the gradient penalty sees the score alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .profiling import nvtx_range

LOSSES = ("nonsat", "minimax", "wgan-gp")
PENALIZED = ("wgan-gp",)  # the losses whose D step draws mixing factors for a gradient penalty
WGAN_LAMBDA = 10.0
WGAN_DRIFT = 0.001
WGAN_TARGET = 1.0
#: Whose gradient the penalty constrains. "max": the gradient with respect to D's input as the official
#: code feeds it, every image nearest-upscaled to the final resolution (D average-pools it back), whose
#: norm is the phase-resolution gradient's divided by ``max_res / res`` (:func:`penalty_norm_scale`).
#: "phase": the gradient at the phase's own resolution (progan_fast before 0.x; up to ``max_res / 4``
#: times harder on D while growing).
GP_RESOLUTIONS = ("max", "phase")


def penalty_norm_scale(res: int, max_res: int, gp_resolution: str = "max") -> float:
    """The factor from the norm of D's gradient at ``res`` to the norm the penalty constrains.

    With ``x_full = upsample_nearest(x, f)``, ``f = max_res / res``, and a D that first averages
    each ``f x f`` block of ``x_full`` back to ``x``: every full-resolution pixel gets ``1/f**2`` of
    its block's gradient, so ``||grad_full||**2 = f**2 * ||grad / f**2||**2`` and
    ``||grad_full|| = ||grad|| / f``. ``f`` is a power of two, so the product is exact. It is a
    constant of the phase (its resolution), like the shapes: a CUDA graph, captured per phase,
    holds the right one.
    """
    if gp_resolution not in GP_RESOLUTIONS:
        raise ValueError(f"gp_resolution must be one of {', '.join(GP_RESOLUTIONS)}, not {gp_resolution!r}")
    return res / max_res if gp_resolution == "max" else 1.0


def split_outputs(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """D's output -> (scores ``[N]``, class logits ``[N, C]`` or None for an unconditional D)."""
    return (out, None) if out.dim() == 1 else (out[:, 0], out[:, 1:])


def label_penalty(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The auxiliary classifier's softmax cross-entropy, a batch mean (official ``LabelPenalty``)."""
    return F.cross_entropy(class_logits, labels)


def d_logistic(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``-(E[log D(x)] + E[log(1 - D(G(z)))])`` for ``nonsat`` and ``minimax``."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """``L_G' = -E[log D(G(z))]``."""
    return F.softplus(-fake_logits).mean()


def g_minimax(fake_logits: torch.Tensor) -> torch.Tensor:
    """``L_G = E[log(1 - D(G(z)))]`` (saturates when D wins; kept for comparison)."""
    return -F.softplus(fake_logits).mean()


def d_wgan(real_scores: torch.Tensor, fake_scores: torch.Tensor, drift: float = WGAN_DRIFT) -> torch.Tensor:
    """WGAN critic loss with ProGAN's drift term ``drift * E[D(x)^2]`` (penalty added separately)."""
    return fake_scores.mean() - real_scores.mean() + drift * real_scores.square().mean()


def g_wgan(fake_scores: torch.Tensor) -> torch.Tensor:
    return -fake_scores.mean()


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    reals: torch.Tensor,
    fakes: torch.Tensor,
    mix: torch.Tensor | None = None,
    weight: float = WGAN_LAMBDA,
    target: float = WGAN_TARGET,
    grad_scale: torch.Tensor | None = None,
    norm_scale: float = 1.0,
) -> torch.Tensor:
    """``weight / target**2 * E[(norm_scale * ||grad_x D(x_hat)||_2 - target)^2]`` with ``x_hat = lerp(reals, fakes, mix)``.

    ``norm_scale`` (:func:`penalty_norm_scale`) makes it the penalty on the gradient with respect to
    the input upscaled to the final resolution, as the official code computes it while growing.

    ``mix`` is ``[N, 1, 1, 1]`` uniform in [0, 1) (drawn here when not given). The graph is kept
    (``create_graph``) so the penalty's gradient reaches D's parameters: a double backward.

    ``x_hat`` has the reals' dtype (fakes from a bf16 generator are cast up), so the gradient and
    its norm are float32 under ``--amp``. With fp16 loss scaling, ``grad_scale`` scales the scores
    before the inner backward (whose fp16 intermediates would otherwise underflow) and the
    gradient is unscaled before the norm, as PyTorch's AMP recipe for gradient penalties does; an
    overflow there makes the penalty non-finite and the whole step is skipped.
    """
    if mix is None:
        mix = torch.rand(reals.shape[0], 1, 1, 1, device=reals.device, dtype=reals.dtype)
    mixed = torch.lerp(reals.detach(), fakes.detach().to(reals.dtype), mix).requires_grad_(True)
    scores = critic(mixed).sum()
    if grad_scale is not None:
        scores = scores * grad_scale
    (grad,) = torch.autograd.grad(scores, mixed, create_graph=True)
    if grad_scale is not None:
        grad = grad / grad_scale
    norms = grad.flatten(1).norm(dim=1)
    if norm_scale != 1.0:
        norms = norms * norm_scale
    return (norms - target).square().mean() * (weight / target**2)


def discriminator_loss(
    kind: str,
    critic: Callable[[torch.Tensor], torch.Tensor],
    reals: torch.Tensor,
    fakes: torch.Tensor,
    grad_scale: torch.Tensor | None = None,
    mix: torch.Tensor | None = None,
    real_labels: torch.Tensor | None = None,
    fake_labels: torch.Tensor | None = None,
    cond_weight: float = 1.0,
    penalty_norm_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """D's loss for ``kind`` and the detached terms worth logging (``grad_scale``, ``mix`` and
    ``penalty_norm_scale``, its ``norm_scale``: see :func:`gradient_penalty`). A conditional D also gets the reals' and the fakes' labels."""
    (real_out, real_cls), (fake_out, fake_cls) = split_outputs(critic(reals)), split_outputs(critic(fakes))
    stats = {"D_real": real_out.detach().mean(), "D_fake": fake_out.detach().mean()}
    if kind in ("nonsat", "minimax"):
        loss = d_logistic(real_out, fake_out)
    elif kind == "wgan-gp":
        with nvtx_range("penalty"):
            penalty = gradient_penalty(lambda x: split_outputs(critic(x))[0], reals, fakes, mix=mix,
                                       grad_scale=grad_scale, norm_scale=penalty_norm_scale)
        loss = d_wgan(real_out, fake_out) + penalty
        stats["penalty"] = penalty.detach()
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    if real_cls is not None:
        if real_labels is None or fake_labels is None:
            raise ValueError("a conditional discriminator's loss needs the reals' and the fakes' labels")
        labels_term = label_penalty(real_cls, real_labels) + label_penalty(fake_cls, fake_labels)
        loss = loss + cond_weight * labels_term
        stats["D_labels"] = labels_term.detach()
        stats["D_label_accuracy"] = (real_cls.detach().argmax(1) == real_labels).float().mean()
    return loss, stats


def generator_loss(kind: str, fake_out: torch.Tensor, fake_labels: torch.Tensor | None = None,
                   cond_weight: float = 1.0) -> torch.Tensor:
    """G's loss for ``kind`` from D's output on the fakes (conditional: and the labels G was given)."""
    scores, cls = split_outputs(fake_out)
    if kind == "nonsat":
        loss = g_nonsaturating(scores)
    elif kind == "minimax":
        loss = g_minimax(scores)
    elif kind == "wgan-gp":
        loss = g_wgan(scores)
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    if cls is not None:
        if fake_labels is None:
            raise ValueError("a conditional discriminator's output needs the fakes' labels")
        loss = loss + cond_weight * label_penalty(cls, fake_labels)
    return loss
