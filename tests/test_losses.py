"""Losses against the seeds' gradient formulas, and WGAN-GP against a critic with a known gradient."""

import math

import pytest
import torch

from progan_fast import losses


def probabilities(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01).requires_grad_(True)


def logit(p):
    return torch.log(p) - torch.log1p(-p)


def test_discriminator_loss_gradients_match_the_seed():
    # L_D = -(E[log D(x)] + E[log(1 - D(G(z)))]); the seed: dL_D/dD(x) = -1/D(x), dL_D/dD(G(z)) = 1/(1 - D(G(z))),
    # each over the batch size for the mean.
    p_real, p_fake = probabilities(7, 0), probabilities(5, 1)
    loss = losses.d_logistic(logit(p_real), logit(p_fake))
    torch.testing.assert_close(loss, -(torch.log(p_real).mean() + torch.log1p(-p_fake).mean()))
    loss.backward()
    torch.testing.assert_close(p_real.grad, -1 / p_real.detach() / 7)
    torch.testing.assert_close(p_fake.grad, 1 / (1 - p_fake.detach()) / 5)


def test_nonsaturating_generator_gradient_matches_the_seed():
    # L_G' = -E[log D(G(z))]: dL_G'/dD(G(z)) = -1/D(G(z))
    p = probabilities(6, 2)
    losses.g_nonsaturating(logit(p)).backward()
    torch.testing.assert_close(p.grad, -1 / p.detach() / 6)


def test_minimax_generator_gradient_matches_the_seed():
    # L_G = E[log(1 - D(G(z)))]: dL_G/dD(G(z)) = -1/(1 - D(G(z)))
    p = probabilities(6, 3)
    loss = losses.g_minimax(logit(p))
    torch.testing.assert_close(loss, torch.log1p(-p).mean())
    loss.backward()
    torch.testing.assert_close(p.grad, -1 / (1 - p.detach()) / 6)


def test_logistic_losses_are_stable_for_extreme_logits():
    big = torch.tensor([200.0, -200.0, 80.0, -80.0], requires_grad=True)
    for loss in (losses.d_logistic(big, big), losses.g_nonsaturating(big), losses.g_minimax(big)):
        (g,) = torch.autograd.grad(loss, big)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    # -log(sigmoid(-200)) is 200, which a naive log(sigmoid(x)) turns into inf
    assert losses.g_nonsaturating(torch.tensor([-200.0])).item() == pytest.approx(200.0)


def test_gradient_penalty_of_a_linear_critic():
    # D(x) = <w, x>: the gradient is w everywhere, so the penalty is lambda * (||w|| - 1)^2.
    w = torch.randn(3, 4, 4, dtype=torch.float64)
    critic = lambda x: (x * w).flatten(1).sum(1)  # noqa: E731
    reals, fakes = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    penalty = losses.gradient_penalty(critic, reals, fakes)
    assert penalty.item() == pytest.approx(10 * (w.norm().item() - 1) ** 2)


def test_gradient_penalty_reaches_the_critics_parameters():
    # D(x) = a * sum(x^2) / 2: grad = a * x_hat, so d penalty / d a is nonzero and analytic.
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    critic = lambda x: a * x.square().flatten(1).sum(1) / 2  # noqa: E731
    reals, fakes = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    mix = torch.rand(4, 1, 1, 1, dtype=torch.float64)
    penalty = losses.gradient_penalty(critic, reals, fakes, mix=mix)
    penalty.backward()
    norms = torch.lerp(reals, fakes, mix).flatten(1).norm(dim=1)
    expected = (10 * 2 * (a.detach() * norms - 1) * norms).mean()
    torch.testing.assert_close(a.grad, expected)


def test_wgan_losses_and_drift():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    assert losses.d_wgan(real, fake).item() == pytest.approx(-0.5 - 2.0 + 0.001 * 5.0)
    assert losses.g_wgan(fake).item() == pytest.approx(0.5)


def test_discriminator_loss_dispatch():
    critic = lambda x: x.flatten(1).sum(1)  # noqa: E731
    reals, fakes = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    loss, stats = losses.discriminator_loss("wgan-gp", critic, reals, fakes)
    assert "penalty" in stats and torch.isfinite(loss)
    # ||grad|| = sqrt(12) for this critic
    assert stats["penalty"].item() == pytest.approx(10 * (math.sqrt(12) - 1) ** 2, rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.discriminator_loss("hinge", critic, reals, fakes)
