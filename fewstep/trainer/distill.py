"""Distillation of the teacher into ONE step-adaptive student (1, 2, 3 and 4 NFE, CFG baked in).

Stage 1, ODE-pair regression (CausVid / DMD's initialisation): the teacher, with classic CFG,
turns noises z into samples x0_T. The student learns, with the flow parameterisation
``x0_hat = x_t - t * v``:

* at t = 1: z → x0_T, the 1-NFE map (the hard one);
* at every other timestep of the 2–4 NFE schedules: (1 - t) x0_T + t eps → x0_T, which is
  exactly the state distribution the re-noising sampler gives it at inference.

Stage 2, distribution matching (DMD / DMD2), optional (`dmd_steps`): the regression target
of a 1-NFE map is the average of everything a noise could become, so its images are soft.
DMD pushes the student's samples along the difference of two scores, the teacher's (with
CFG: the "real" score) and a "fake" score trained online on the student's own samples,
which sharpens samples toward the teacher's distribution without needing paired targets.
The regression loss stays on as a regulariser (as in DMD).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from fewstep.evaluation import shapes
from fewstep.models.checkpoint import save_checkpoint
from fewstep.models.sampling import cfg_flow, teacher_sample
from fewstep.models.schedules import TeacherSampler, default_student_schedule
from fewstep.models.unet import as_denoiser, denoise, load_unet
from fewstep.trainer.captions import CaptionBank
from fewstep.trainer.plots import save_curves
from fewstep.trainer.progress import Progress, beat
from fewstep.trainer.stages import ABLATION_DIR, IMAGE_EVALUATION, STUDENT_DIR, TEACHER_DIR, ImageRecipe
from fewstep.trainer.teacher import cosine_lr


def make_pairs(
    teacher: torch.nn.Module,
    bank: CaptionBank,
    sampler: TeacherSampler,
    seed: int,
    count: int,
    chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`count` (noise, teacher sample, states, mask) tuples for training captions."""
    g = torch.Generator().manual_seed(seed + 1)
    zs, xs, ss, ms = [], [], [], []
    t0 = time.time()
    for i in range(0, count, chunk):
        n = min(chunk, count - i)
        _, _, caps = shapes.batch(seed + 31337, i // chunk, n)
        states, mask = bank.lookup(caps)
        z = torch.randn((n, 3, 32, 32), generator=g)
        x0, _ = teacher_sample(as_denoiser(teacher), sampler, states, mask, bank.null_states, bank.null_mask, z)
        zs.append(z)
        xs.append(x0.clamp(-1, 1))
        ss.append(states)
        ms.append(mask)
        print(f"  pairs {i + n}/{count} ({time.time() - t0:.0f}s)", flush=True)
        beat()
    return torch.cat(zs), torch.cat(xs), torch.cat(ss), torch.cat(ms)


def _half_at_one(batch: int, lower: list[float], g: torch.Generator) -> torch.Tensor:
    """Per-item times: the first half at t = 1 (the 1-NFE map), the rest drawn from `lower`."""
    t = torch.ones(batch)
    half = batch // 2
    t[half:] = torch.tensor(lower)[torch.randint(0, len(lower), (batch - half,), generator=g)]
    return t


def _regression_loss(
    student: torch.nn.Module,
    z: torch.Tensor,
    x0: torch.Tensor,
    states: torch.Tensor,
    mask: torch.Tensor,
    t: torch.Tensor,
    g: torch.Generator,
) -> torch.Tensor:
    """MSE between the student's x0 estimate and the teacher sample, at per-item times `t`."""
    eps = torch.randn(x0.shape, generator=g)
    tb = t.view(-1, 1, 1, 1)
    # At t = 1 the input is the pair's own noise (the ODE map); below, a fresh re-noising.
    xt = torch.where(tb >= 1.0, z, (1 - tb) * x0 + tb * eps)
    v = denoise(student, xt, t, states, mask)
    return F.mse_loss(xt - tb * v, x0)


def train_student(
    teacher: torch.nn.Module,
    pairs: tuple[torch.Tensor, ...],
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    log_every: int = 50,
    init: torch.nn.Module | None = None,
    deadline: float | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """Stage 1: regression on ODE pairs. Half of every batch is t = 1 (the 1-NFE map).

    Starts from a copy of `init` (default: the teacher); stops early at `deadline` (time.monotonic()).
    """
    z_all, x_all, s_all, m_all = pairs
    g = torch.Generator().manual_seed(seed + 2)
    torch.manual_seed(seed + 2)
    student = copy.deepcopy(init if init is not None else teacher).train()
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    lower = sorted({t for ts in default_student_schedule().timesteps.values() for t in ts if t < 1.0})
    losses: list[float] = []
    progress = Progress("student step", steps, log_every)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * cosine_lr(step, steps, warmup=min(100, steps // 10 + 1))
        idx = torch.randint(0, len(z_all), (batch,), generator=g)
        t = _half_at_one(batch, lower, g)
        loss = _regression_loss(student, z_all[idx], x_all[idx], s_all[idx], m_all[idx], t, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        progress.update(loss=losses[-1])
        if deadline is not None and time.monotonic() >= deadline:
            break
    return student.eval(), losses


def train_dmd(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    bank: CaptionBank,
    pairs: tuple[torch.Tensor, ...] | None,
    guidance: float,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    reg_weight: float = 0.5,
    log_every: int = 25,
) -> tuple[torch.nn.Module, dict[str, list[float]]]:
    """Stage 2: distribution matching on the 1-NFE output plus the regression regulariser.

    `reg_weight=0` is pure DMD (mode-seeking, no anchor to the teacher's pairs; `pairs` may be None).
    """
    if pairs is None and reg_weight > 0:
        raise ValueError("the regression regulariser needs ODE pairs")
    g = torch.Generator().manual_seed(seed + 3)
    student = student.train()
    fake = copy.deepcopy(teacher).train()
    for p in fake.parameters():
        p.requires_grad_(True)
    opt_g = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=lr * 2, weight_decay=0.0)
    lower = sorted({t for ts in default_student_schedule().timesteps.values() for t in ts if t < 1.0})
    curves: dict[str, list[float]] = {"dmd": [], "regression": [], "fake score": []}
    progress = Progress("dmd step", steps, log_every)
    for step in range(steps):
        # Drawn first, as it always was, so that `make train` keeps reproducing the shipped student.
        idx = torch.randint(0, len(pairs[0]), (batch,), generator=g) if pairs is not None else None
        _, _, caps = shapes.batch(seed + 4242, step, batch)
        states, mask = bank.lookup(caps)
        z = torch.randn((batch, 3, 32, 32), generator=g)
        ones = torch.ones(batch)
        x_gen = z - denoise(student, z, ones, states, mask)

        t = 0.02 + 0.96 * torch.rand(batch, generator=g)
        tb = t.view(-1, 1, 1, 1)
        xt = (1 - tb) * x_gen.detach() + tb * torch.randn(x_gen.shape, generator=g)
        with torch.no_grad():
            x0_real = xt - tb * cfg_flow(
                as_denoiser(teacher), xt, t, states, mask, bank.null_states, bank.null_mask, guidance
            )
            x0_fake = xt - tb * denoise(fake, xt, t, states, mask)
            norm = (x_gen - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-3)
            grad = (x0_fake - x0_real) / norm
        loss_dmd = 0.5 * F.mse_loss(x_gen, (x_gen - grad).detach())
        if pairs is not None and idx is not None and reg_weight > 0:
            z_all, x_all, s_all, m_all = pairs
            t_reg = _half_at_one(batch, lower, g)
            loss_reg = _regression_loss(student, z_all[idx], x_all[idx], s_all[idx], m_all[idx], t_reg, g)
        else:
            loss_reg = torch.zeros(())
        opt_g.zero_grad(set_to_none=True)
        (loss_dmd + reg_weight * loss_reg).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt_g.step()

        tf = torch.sigmoid(torch.randn(batch, generator=g))
        eps = torch.randn(x_gen.shape, generator=g)
        xf = (1 - tf.view(-1, 1, 1, 1)) * x_gen.detach() + tf.view(-1, 1, 1, 1) * eps
        loss_fake = F.mse_loss(denoise(fake, xf, tf, states, mask), eps - x_gen.detach())
        opt_f.zero_grad(set_to_none=True)
        loss_fake.backward()
        opt_f.step()

        values = {"dmd": loss_dmd.item(), "regression": loss_reg.item(), "fake score": loss_fake.item()}
        for k, v in values.items():
            curves[k].append(v)
        progress.update(**values)
    return student.eval(), curves


def _student_manifest(teacher_manifest: dict, recipe: ImageRecipe, extra: dict) -> dict:
    schedule = default_student_schedule()
    return {
        "name": "shapes",
        "version": "1",
        "kind": "image",
        "architecture": teacher_manifest["architecture"],
        "text_encoder": teacher_manifest["text_encoder"],
        "native_size": teacher_manifest["native_size"],
        "schedule": schedule.to_dict(),
        "teacher": {
            "name": teacher_manifest["name"],
            "version": teacher_manifest.get("version"),
            "sha256": teacher_manifest["files"]["model.safetensors"]["sha256"],
            "sampler": teacher_manifest["sampler"],
        },
        "evaluation": IMAGE_EVALUATION,
        "trainer": {"recipe": asdict(recipe), **extra},
    }


def stage_student(r: ImageRecipe, out: Path, docs: Path, bank: CaptionBank, work: Path) -> None:
    t0 = time.time()
    teacher_manifest, teacher = load_unet(out / TEACHER_DIR)  # frozen: no gradients
    sampler = TeacherSampler(
        steps=r.pair_sampler_steps, guidance=TeacherSampler.from_dict(teacher_manifest["sampler"]).guidance
    )
    pairs = make_pairs(teacher, bank, sampler, r.seed, r.pair_count)
    student, losses = train_student(teacher, pairs, r.seed, r.student_steps, r.student_batch, r.student_lr)
    curves: dict[str, list[float]] = {"ODE-pair regression": losses}
    extra = {"pairs": r.pair_count, "pair_sampler": sampler.to_dict(), "regression_steps": r.student_steps}
    if r.dmd_steps > 0:
        save_checkpoint(work / ABLATION_DIR, student.state_dict(), _student_manifest(teacher_manifest, r, extra))
        student, dmd_curves = train_dmd(
            student, teacher, bank, pairs, sampler.guidance, r.seed, r.dmd_steps, r.student_batch // 2, r.student_lr / 3
        )
        curves.update({f"DMD: {k}": v for k, v in dmd_curves.items()})
        extra["dmd_steps"] = r.dmd_steps
    save_curves(curves, docs / "student_loss.png", "image student distillation")
    extra["seconds"] = round(time.time() - t0, 1)
    save_checkpoint(out / STUDENT_DIR, student.state_dict(), _student_manifest(teacher_manifest, r, extra))
