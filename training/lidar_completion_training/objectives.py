"""Training objectives in plain PyTorch: the LiDiff teacher loss and (preference) score distillation.

Kept free of Lightning so they can be unit-tested and reused by any training engine. Every
function takes an explicit ``torch.Generator`` so a run is reproducible step by step
(kill-and-resume ends on the same weights).

Score-distillation gradient (why the published generator loss is replaced)
-------------------------------------------------------------------------
With the local parameterisation ``x_t = x_0 + sigma_t eps`` the score of a model is
``s(x_t) = -eps(x_t) / sigma_t``. Distilling the teacher into the student's sample
distribution minimises ``KL(p_student || p_teacher)``, whose gradient w.r.t. the student
parameters is ``E_t,eps[(s_aux(x_t) - s_teacher(x_t)) dx_0/dtheta]`` (the auxiliary net
tracks the student's own distribution), i.e. ``E[(eps_teacher - eps_aux) / sigma_t dx_0/dtheta]``.
In x0-space this is ``(x0_aux - x0_teacher) / sigma_t^2 * sigma_t``; we use the DMD
normalisation: direction ``g = x0_aux - x0_teacher = sigma_t (eps_teacher - eps_aux)``
divided by ``mean|x_0 - x0_teacher|`` per scan, which makes the step size independent of
``t`` and of the scene scale. The surrogate ``0.5 ||x_0 - sg(x_0 - g)||^2 / N`` has exactly
``g / N`` as gradient w.r.t. the student's sample ``x_0`` — so, unlike the published
``((eps_teacher - eps_aux) * (x_t - x_0)).mean()`` (which does not depend on the student at
all: ``x_t - x_0 = sigma_t eps``), the student receives the gradient.

Distillation-DPO applies this to the preferred sample (winner) and subtracts
``loser_weight`` times the same term on the rejected one (loser): descend KL on the winner,
ascend it on the loser. Plain score distillation is the winner term on a single sample.

Regression term (DMD, Yin et al. 2024, eq. 7): distribution matching alone pulls the student
towards the teacher's *many-step* sample distribution, and here the teacher's few-step samples
have a lower Chamfer distance than its 50-step ones. ``regression_weight`` > 0 adds
``mean ||x_student(z) - x_teacher_K(z)||^2``: the student's sample from start noise ``z`` should
land where the teacher's ``K``-step sample from the same ``z`` lands (points keep their index
through sampling, so the pairing is exact and no matching is needed). Both modes get the same
term, so the DPO-vs-plain ablation still isolates the preference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lidar_completion.completer import encode_scans, predict_noise
from lidar_completion.diffusion import NoiseSchedule, make_sampler, sample
from lidar_completion.model import CompletionModel
from lidar_completion.networks import Denoiser
from lidar_completion.sparse import SparseTensor

__all__ = [
    "teacher_loss",
    "generate",
    "DistillationLosses",
    "distillation_iteration",
    "chamfer_preference",
    "seeded_generator",
    "refine_loss",
]


def _noise_step(
    schedule: NoiseSchedule, x0: torch.Tensor, generator: torch.Generator, max_timestep: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random timestep per scan in [0, max_timestep] (default all), noise, and the locally noised points."""
    high = schedule.num_train_timesteps if max_timestep is None else max_timestep + 1
    t = torch.randint(0, high, (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    return t, noise, schedule.add_noise(x0, noise, t)


def _predict(model: CompletionModel, denoiser: Denoiser, x_t: torch.Tensor, scan: SparseTensor, t: torch.Tensor) -> torch.Tensor:
    """Noise prediction of ``denoiser`` (any of teacher / student / auxiliary) on [B, N, 3]."""
    return predict_noise(model, x_t, [scan], t, denoiser)[0]


def denoising_loss(model: CompletionModel, eps_hat: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """MSE in the space the denoiser predicts: on the noise for epsilon models (LiDiff), on the
    displacement ``-sigma_t eps`` for displacement models (= noise MSE weighted by sigma_t^2)."""
    if model.config.prediction == "epsilon":
        return F.mse_loss(eps_hat, eps)
    sigma = model.schedule.noise_scale(t).view(-1, 1, 1)
    return F.mse_loss(sigma * eps_hat, sigma * eps)


def teacher_loss(
    model: CompletionModel,
    schedule: NoiseSchedule,
    partial: torch.Tensor,
    full: torch.Tensor,
    generator: torch.Generator,
    uncond_prob: float = 0.1,
    reg_weight: float = 5.0,
    max_timestep: int | None = None,
) -> dict[str, torch.Tensor]:
    """LiDiff objective: MSE(eps_hat, eps) + reg_weight * (mean(eps_hat)^2 + (std(eps_hat) - 1)^2)
    (the MSE in the model's prediction space: :func:`denoising_loss`; ``mse`` logs the noise MSE).

    The condition is dropped (all-zero scan) with probability ``uncond_prob`` per batch so
    classifier-free guidance works at inference. ``max_timestep`` limits training to the
    noise levels the sampler visits (it starts at t0).
    """
    t, noise, x_t = _noise_step(schedule, full, generator, max_timestep)
    drop = torch.rand((), generator=generator, device=full.device).item() < uncond_prob
    if drop:
        # An all-zero scan is one voxel per batch entry: batch statistics are meaningless
        # (and undefined for B = 1), so encode it with running statistics, as at inference.
        was_training = model.encoder.training
        model.encoder.eval()
        scan = encode_scans(model, torch.zeros_like(partial))
        model.encoder.train(was_training)
    else:
        scan = encode_scans(model, partial)
    eps = _predict(model, model.denoiser, x_t, scan, t)
    loss = denoising_loss(model, eps, noise, t)
    reg = eps.mean() ** 2 + (eps.std() - 1.0) ** 2 if reg_weight else torch.zeros(())
    return {"loss": loss + reg_weight * reg, "mse": F.mse_loss(eps.detach(), noise), "reg": reg.detach()}


def generate(
    model: CompletionModel,
    generator_net: Denoiser,
    partial: torch.Tensor,
    scan: SparseTensor,
    noise: torch.Tensor,
    noise_scale: float,
    steps: int = 1,
    repeat: int = 10,
    generator: torch.Generator | None = None,
    bound: float | None = None,
) -> torch.Tensor:
    """The student's completion from ``x_init + noise_scale * start_scale * noise`` with the
    model's own sampler (kind and t0 from its config) in ``steps`` steps — the very loop the
    inference pipeline runs — differentiable w.r.t. the student."""
    mc = model.config
    sampler = make_sampler(mc, mc.sampler, steps, mc.t0)
    x_init = partial.repeat(1, repeat, 1)
    return sample(lambda x_t, t: _predict(model, generator_net, x_t, scan, t), sampler, x_init, noise_scale * noise, generator, bound)


def sample_bound(partial: torch.Tensor) -> float:
    """Box (m) that keeps a diverging model's samples voxelisable: 4x the scan's extent."""
    return 4.0 * float(partial.detach().abs().max().clamp_min(1.0))


def chamfer_preference(samples: list[torch.Tensor], full: torch.Tensor) -> torch.Tensor:
    """Chamfer distance of each sample [B, N, 3] to its ground truth: [len(samples), B].

    The preference metric is pluggable: any callable with this signature works.
    """
    from lidar_completion_training.metrics import chamfer_distance

    gt = full.detach().cpu().numpy()
    return torch.tensor(
        [[chamfer_distance(s[b].detach().cpu().numpy(), gt[b]) for b in range(s.shape[0])] for s in samples],
        dtype=torch.float64,
    )


@dataclass
class DistillationLosses:
    generator: torch.Tensor
    aux: torch.Tensor
    logs: dict[str, float]


def _dmd_surrogate(
    model: CompletionModel,
    schedule: NoiseSchedule,
    teacher: Denoiser,
    aux: Denoiser,
    x0: torch.Tensor,
    scan: SparseTensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Per-scan surrogate whose gradient w.r.t. ``x0`` is the normalised score difference."""
    with torch.no_grad():
        sigma = schedule.noise_scale(t).view(-1, 1, 1)
        x_t = x0.detach() + sigma * noise
        eps_teacher = _predict(model, teacher, x_t, scan, t)
        eps_aux = _predict(model, aux, x_t, scan, t)
        x0_teacher = x_t - sigma * eps_teacher
        direction = sigma * (eps_teacher - eps_aux)  # = x0_aux - x0_teacher
        scale = (x0.detach() - x0_teacher).abs().mean(dim=(1, 2), keepdim=True).clamp_min(1e-6)
        target = x0.detach() - direction / scale
    return 0.5 * ((x0 - target) ** 2).sum(dim=(1, 2)) / x0.shape[1]


def distillation_iteration(
    model: CompletionModel,
    schedule: NoiseSchedule,
    student: Denoiser,
    teacher: Denoiser,
    aux_nets: list[Denoiser],
    partial: torch.Tensor,
    full: torch.Tensor,
    generator: torch.Generator,
    step_aux: Callable[[torch.Tensor], None],
    step_student: Callable[[torch.Tensor], None],
    *,
    preference: bool = True,
    noise_scale_loser: float = 1.1,
    loser_weight: float = 1.0,
    student_steps: int = 1,
    aux_steps: int = 1,
    regression_weight: float = 0.0,
    regression_steps: int = 8,
    repeat: int | None = None,
    max_timestep: int | None = None,
    preference_metric: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor] = chamfer_preference,
) -> DistillationLosses:
    """One Distillation-DPO iteration (or plain score distillation when ``preference`` is
    False: one sample, ``aux_nets[0]`` only).

    (a) the student completes the scan from ``x_init + eps`` and ``x_init + lambda eps``;
    (b) the metric names winner and loser; (c) each auxiliary net takes ``aux_steps``
    diffusion-loss steps (``step_aux(loss)``, fresh timestep and noise each) on its own
    detached sample, so it tracks the moving student more closely than the student moves
    (the two time-scale update of DMD2); (d) the student takes a
    step (``step_student(loss)``) on the score-distillation surrogate of the winner minus
    ``loser_weight`` x that of the loser, scored with the *updated* auxiliaries (as
    published: at initialisation teacher and auxiliaries are equal, so scoring before
    their first step would give the student a zero gradient), plus ``regression_weight`` x the
    paired distance of its unscaled sample to the teacher's ``regression_steps``-step sample
    from the same noise (module docstring).
    """
    with torch.no_grad():
        scan = encode_scans(model, partial)  # the encoder is frozen
    repeat = repeat or full.shape[1] // partial.shape[1]
    noise = torch.randn(partial.shape[0], partial.shape[1] * repeat, 3, generator=generator, device=partial.device)
    scales = [1.0, noise_scale_loser] if preference else [1.0]
    # Bounded box for the student's samples (zero gradient outside): a diverging student
    # must not crash voxelisation with kilometre-scale coordinates.
    box = sample_bound(partial)
    samples = [
        generate(model, student, partial, scan, noise, s, student_steps, repeat, generator).clamp(-box, box)
        for s in scales
    ]
    logs: dict[str, float] = {}
    if preference:
        cd = preference_metric(samples, full)  # [2, B]
        switch = (cd[0] > cd[1]).view(-1, 1, 1).to(partial.device)  # the lambda-scaled sample won
        ranked = [torch.where(switch, samples[1], samples[0]), torch.where(switch, samples[0], samples[1])]
        logs |= {
            "cd_winner": float(torch.minimum(cd[0], cd[1]).mean()),
            "cd_loser": float(torch.maximum(cd[0], cd[1]).mean()),
            "switch_rate": float(switch.double().mean()),
        }
    else:
        ranked = samples
        logs["cd_sample"] = float(preference_metric(samples, full)[0].mean())

    for _ in range(aux_steps):
        aux_loss = partial.new_zeros(())
        for aux, ranked_sample in zip(aux_nets, ranked):
            t, eps, x_t = _noise_step(schedule, ranked_sample.detach(), generator, max_timestep)
            aux_loss = aux_loss + denoising_loss(model, _predict(model, aux, x_t, scan, t), eps, t)
        step_aux(aux_loss)

    # Same t and noise for winner and loser, as published.
    high = schedule.num_train_timesteps if max_timestep is None else max_timestep + 1
    t = torch.randint(0, high, (partial.shape[0],), generator=generator, device=partial.device)
    eps = torch.randn(ranked[0].shape, generator=generator, device=partial.device)
    gen_loss = _dmd_surrogate(model, schedule, teacher, aux_nets[0], ranked[0], scan, t, eps).mean()
    if preference:
        gen_loss = gen_loss - loser_weight * _dmd_surrogate(model, schedule, teacher, aux_nets[1], ranked[1], scan, t, eps).mean()
    if regression_weight:
        with torch.no_grad():
            target = generate(model, teacher, partial, scan, noise, 1.0, regression_steps, repeat).clamp(-box, box)
        regression = ((samples[0] - target) ** 2).sum(-1).mean()
        gen_loss = gen_loss + regression_weight * regression
        logs["loss_regression"] = float(regression.detach())
    step_student(gen_loss)
    logs |= {"loss_aux": float(aux_loss.detach()), "loss_generator": float(gen_loss.detach())}
    return DistillationLosses(generator=gen_loss.detach(), aux=aux_loss.detach(), logs=logs)


def seeded_generator(seed: int, step: int, rank: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """Randomness of one training step, a pure function of (seed, step, rank)."""
    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device).manual_seed(mixed)


def _nearest_sq(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Differentiable squared distance from each ``src`` point to its nearest ``dst`` point
    (neighbours found with scipy's KD-tree on detached copies, then gathered with grad)."""
    from scipy.spatial import cKDTree

    index = cKDTree(dst.detach().cpu().numpy()).query(src.detach().cpu().numpy(), k=1)[1]
    return ((src - dst[torch.from_numpy(index).to(src.device)]) ** 2).sum(-1)


def refine_loss(
    model: CompletionModel,
    full: torch.Tensor,
    generator: torch.Generator,
    jitter: float = 0.1,
    coarse: list[torch.Tensor] | None = None,
    accuracy_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Refinement net objective: each coarse point plus its 6 predicted offsets must cover the
    ground truth (Chamfer distance, its refined -> ground-truth term weighted by
    ``accuracy_weight``). ``coarse`` [M_b, 3] per scene: the base model's own completions (what
    the net refines at run time, as LiDiff trains it); None: a sparse, ``jitter``-ed sixth of
    the ground truth.

    Why weight accuracy: learning on completions, the symmetric Chamfer distance lets offsets
    throw points up to a metre to reach ground truth the completion missed, which fills 0.5 m
    cells the scene does not have (validation IoU 0.5 0.61 with weight 1, 0.69 with 3, 0.74
    with 6). ``chamfer`` logs the symmetric distance whatever the weight."""
    losses, chamfers = [], []
    for index, scene in enumerate(full):  # [N, 3] per batch entry
        if coarse is None:
            keep = torch.randperm(scene.shape[0], generator=generator, device=scene.device)[: scene.shape[0] // 6]
            points = scene[keep] + jitter * torch.randn(keep.shape[0], 3, generator=generator, device=scene.device)
        else:
            points = coarse[index]
        offsets = model.refiner(model.voxelize(points))
        dense = (points[:, None, :] + offsets.reshape(-1, 6, 3)).reshape(-1, 3)
        accuracy, completeness = _nearest_sq(dense, scene).sqrt().mean(), _nearest_sq(scene, dense).sqrt().mean()
        losses.append((accuracy_weight * accuracy + completeness) / (accuracy_weight + 1.0))
        chamfers.append(0.5 * (accuracy + completeness).detach())
    return {"loss": torch.stack(losses).mean(), "chamfer": torch.stack(chamfers).mean()}
