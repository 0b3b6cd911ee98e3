"""One training iteration (forward, backward, step): ours vs nnU-Net v2's trainer step, same network.

Run on demand (not a test; needs the ``bench`` extra)::

    .venv/bin/python benchmarks/bench_train_step.py                    # batch 2, patch 64^3
    .venv/bin/python benchmarks/bench_train_step.py --patch 48 --repeats 5

Both sides train the same 3d_fullres U-Net (deep supervision on), from the same weights: ours is
``napari_medseg``'s NNUNet stepped by ``engine.training.Trainer.train_step`` (its Dice + CE
deep-supervision loss, SGD Nesterov, gradient clipping at 12); nnU-Net's is
``dynamic_network_architectures``' PlainConvUNet (weights copied from ours by an explicit key
mapping and checked equal on every deep-supervision output) stepped by
``nnUNetTrainer.train_step``, with the loss and optimizer its own ``_build_loss`` and
``configure_optimizers`` make. Both methods run unbound on a namespace holding just the attributes
they read, so no plans files or datasets are needed. The two are interleaved; the ratio is
ours / nnU-Net (below 1 = faster).
"""

from __future__ import annotations

import argparse
import functools
from types import SimpleNamespace

import numpy as np
import torch
from _timing import interleaved, median, report
from bench_inference import assert_same, build_ours, build_plain, unet_config

from napari_medseg.engine.training import DeepSupervisionLoss, DiceCELoss, Trainer


def ours_step(model, classes: int, device: torch.device):
    ns = SimpleNamespace(
        model=model, device=device, amp=device.type == "cuda",
        optimizer=torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, weight_decay=3e-5, nesterov=True),
        loss_fn=DeepSupervisionLoss(DiceCELoss(batch_dice=False), None),
        scaler=torch.amp.GradScaler("cuda", enabled=device.type == "cuda"),
        config=SimpleNamespace(grad_clip=12.0),
    )
    ns.compute_loss = functools.partial(Trainer.compute_loss, ns)
    ns.optimize = functools.partial(Trainer.optimize, ns)
    return lambda images, labels: Trainer.train_step(ns, images, labels[:, None])  # (B, 1, ...) labels


def nnunet_step(plain, n_outputs: int, device: torch.device):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    ns = SimpleNamespace(
        network=plain, device=device, initial_lr=1e-2, weight_decay=3e-5, num_epochs=1000, is_ddp=False,
        enable_deep_supervision=True,
        label_manager=SimpleNamespace(has_regions=False, ignore_label=None),
        configuration_manager=SimpleNamespace(batch_dice=False),
        _do_i_compile=lambda: False,
        _get_deep_supervision_scales=lambda: [None] * n_outputs,
        grad_scaler=torch.amp.GradScaler("cuda") if device.type == "cuda" else None,
    )
    ns.loss = nnUNetTrainer._build_loss(ns)
    ns.optimizer, _ = nnUNetTrainer.configure_optimizers(ns)
    return lambda batch: nnUNetTrainer.train_step(ns, batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patch", type=int, nargs="+", default=[64])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--base-width", type=int, default=32)
    p.add_argument("--max-width", type=int, default=320)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    patch = tuple(args.patch * 3 if len(args.patch) == 1 else args.patch)
    pools = unet_config(patch)

    ours = build_ours(1, args.classes, 3, pools, args.base_width, args.max_width, deep_supervision=True)
    plain = build_plain(ours)
    ours.train(), plain.train()
    diff = assert_same(ours, plain, patch, 1)
    ours, plain = ours.to(device), plain.to(device)

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.standard_normal((args.batch, 1, *patch), dtype=np.float32)).to(device)
    labels = torch.from_numpy(rng.integers(0, args.classes, (args.batch, *patch))).to(device)
    # nnU-Net's targets: one (B, 1, ...) map per deep-supervision output, nearest-downsampled.
    targets, factor = [], 1
    for _ in range(len(pools)):
        sl = (slice(None), *[slice(None, None, factor)] * 3)
        targets.append(labels[sl][:, None].float())
        factor *= 2
    batch = {"data": images, "target": targets}

    step_ours = ours_step(ours, args.classes, device)
    step_theirs = nnunet_step(plain, len(pools), device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    print(f"3d_fullres U-Net widths {ours.widths}, deep supervision ({len(pools)} outputs), batch {args.batch}, "
          f"patch {'x'.join(map(str, patch))}, {args.classes} classes, SGD Nesterov 0.99, clip 12, "
          f"{'AMP' if device.type == 'cuda' else 'float32'}; max |output diff| before training {diff:.1e}")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    contenders = {
        "ours": lambda: (step_ours(images, labels), sync()),
        "nnunet": lambda: (step_theirs(batch), sync()),
    }
    cpu: dict[str, list[float]] = {}
    times = interleaved(contenders, args.repeats, warmup=1,
                        on_repeat=lambda r, n, dt: print(f"  repeat {r + 1} {n:8s} {dt:7.2f} s", flush=True), cpu_times=cpu)
    print(f"results (median of {args.repeats}):")
    report(times, "nnunet")
    print("process CPU time (all threads; less sensitive to other processes' load):")
    report(cpu, "nnunet")
    print(f"RATIO train step ours / nnunet = {median(times['ours']) / median(times['nnunet']):.3f}")


if __name__ == "__main__":
    main()
