"""A one-step student trained further with an adversarial term (after Sauer et al. 2023, "Adversarial Diffusion
Distillation", with a PatchGAN on decoded images in place of their pretrained feature network): the loss of
``ldm-train progressive`` at one step, plus ``--adversarial-weight`` times the hinge loss of a
``ldm_train.discriminator.PatchDiscriminator`` that tells the decoder's images of training latents from those of
the student's x̂_0, the discriminator updated once a step with its own Adam.

It measures whether that closes a one-step student's gap to the quality bar ("Prompts encoded at their own length"
in BENCHMARKS.md); it is not a stage of ``ldm-train``. The student starts from ``--init`` (a one-step student from
``ldm-train progressive --sample-steps 1``), the teacher is ``--base``, and the folder written is a model folder
like any other (export it with ``ldm-export``, judge it with ``ldm-eval --sampler ddim --steps 1``)::

    OMP_NUM_THREADS=1 python benchmarks/one_step_adversarial.py --base runs/demo-w3-prog3x24 \\
        --init runs/demo-w3-prog1x3 --out runs/demo-w3-adv-0.05 --adversarial-weight 0.05
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ldm_runtime.checkpoint import load_checkpoint
from ldm_train.discriminator import PatchDiscriminator
from ldm_train.train_lcm import _train
from ldm_train.train_progressive import ProgressiveDistillation, ProgressiveSettings


def adversarial_kind(args: argparse.Namespace) -> type[ProgressiveDistillation]:
    class Adversarial(ProgressiveDistillation):
        def __init__(self, *parts):
            super().__init__(*parts)
            self.autoencoder = load_checkpoint(args.base).autoencoder.requires_grad_(False).eval().to(self.device)
            self.student.load_state_dict(load_checkpoint(args.init).unet.state_dict())
            torch.manual_seed(args.seed)
            self.discriminator = PatchDiscriminator(3, 64, args.discriminator_layers).to(self.device)
            self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(),
                                                            lr=args.discriminator_learning_rate, betas=(0.5, 0.9))
            self.steps_done, self.started = 0, time.perf_counter()
            self.log = open(Path(args.out + ".log"), "w", encoding="utf-8")

        def decoded(self, latents: torch.Tensor) -> torch.Tensor:
            return self.autoencoder.decode(latents / self.config.latent_scale_factor).clamp(-1, 1)

        def loss(self, data, latents, noise, timesteps, caption_ids, generator):
            denoised, wanted, weight = self.student_step(data, latents, noise, caption_ids, generator)
            with torch.no_grad():
                real = self.decoded(latents)
            distillation = (weight * (denoised - wanted).pow(2)).mean()
            fake = self.decoded(denoised)
            judged = torch.relu(1 - self.discriminator(real)).mean() + torch.relu(1 + self.discriminator(
                fake.detach())).mean()
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            judged.backward()
            self.discriminator_optimizer.step()
            self.discriminator.requires_grad_(False)
            adversarial = -self.discriminator(fake).mean()
            self.discriminator.requires_grad_(True)
            self.steps_done += 1
            if self.steps_done % 20 == 0:
                print(json.dumps({"step": self.steps_done, "seconds": round(time.perf_counter() - self.started, 1),
                                  "distillation": float(distillation), "discriminator": float(judged),
                                  "adversarial": float(adversarial)}), file=self.log, flush=True)
            return distillation + args.adversarial_weight * adversarial

    return Adversarial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the teacher: a model folder (the three-step student)")
    parser.add_argument("--init", required=True, help="the one-step student the run starts from")
    parser.add_argument("--out", required=True, help="the model folder to write (and OUT.log, the losses)")
    parser.add_argument("--teacher-steps", type=int, default=3, help="the teacher's DDIM steps")
    parser.add_argument("--steps", type=int, default=800, help="optimiser steps")
    parser.add_argument("--adversarial-weight", type=float, default=0.05)
    parser.add_argument("--learning-rate", type=float, default=2e-5, help="the student's")
    parser.add_argument("--discriminator-learning-rate", type=float, default=2e-4)
    parser.add_argument("--discriminator-layers", type=int, default=2, help="2: 6x6 logits at 32 px")
    parser.add_argument("--seed", type=int, default=1, help="the discriminator's initial weights")
    args = parser.parse_args()
    settings = ProgressiveSettings(base=args.base, out=args.out, sample_steps=1, teacher_steps=args.teacher_steps,
                                   steps=args.steps, learning_rate=args.learning_rate, checkpoint_every=args.steps,
                                   device="cpu", warmup_steps=0)
    _train(settings, "progressive", adversarial_kind(args), torch.device("cpu"))


if __name__ == "__main__":
    main()
