"""Benchmark: the vectorised SDN sweep against a per-position loop, and CPU forward times.

Run on demand (not a test)::

    python benchmarks/bench_sdn.py [--repeats 3] [--threads N]

1. An SDN layer's directional sweeps (directions [0, 2]) computed by ``SDNSweep`` (one matmul per
   swept line for all batch items and all positions on the line, the hidden-state terms of every
   position in one matmul up front) against a straightforward loop over lines and positions
   (one cell call per position, batch items stacked), on batch 4, S = 150, 32x32. Both use the same
   weights; the outputs are checked equal before timing. Prints the speed-up (and the same for
   S = 16, where per-call overhead rather than arithmetic dominates).
2. CPU forward time (eval, no grad, batch 1) of each model at its default configuration on a
   typical input: rkseg-l / rkseg-r on the MSD Hippocampus plans (2D 56x40, 3 pools of (2, 2);
   3D 40x56x40, 3 pools of (2, 2, 2)), sdn-unet / sdn-unetpp on 128x128.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _timing import median_time

from napari_medseg.models.registry import count_parameters, create_model
from napari_medseg.models.rkseg import rkseg_l  # noqa: F401  (registers the RKSeg models)
from napari_medseg.models.sdn import SDN, SDNSweep


def loop_sweep(states: torch.Tensor, sweep: SDNSweep) -> torch.Tensor:
    """Baseline: one cell update per (line, position), batch items stacked; no vectorisation."""
    s = sweep.state_size
    columns = sweep.direction in (0, 1)
    grid = states.permute(3, 0, 2, 1) if columns else states.permute(2, 0, 3, 1)  # (L, B, N, S)
    n_lines, n_pos = grid.shape[0], grid.shape[2]
    cells = [[grid[line, :, pos] for pos in range(n_pos)] for line in range(n_lines)]
    zero = states.new_zeros(states.shape[0], s)
    forward = sweep.direction in (0, 2)
    lines = range(1, n_lines) if forward else range(n_lines - 2, -1, -1)
    for line in lines:
        prev = cells[line - 1] if forward else cells[line + 1]
        for pos in range(n_pos):
            x3 = torch.cat(
                [
                    prev[pos - 1] if pos > 0 else zero,
                    prev[pos],
                    prev[pos + 1] if pos + 1 < n_pos else zero,
                ],
                dim=1,
            )
            h = cells[line][pos]
            gi = torch.addmm(sweep.bias_ih, x3, sweep.weight_ih.t())
            gh = torch.addmm(sweep.bias_hh, h, sweep.weight_hh.t())
            r = torch.sigmoid(gi[:, :s] + gh[:, :s])
            z = torch.sigmoid(gi[:, s : 2 * s] + gh[:, s : 2 * s])
            n = torch.tanh(gi[:, 2 * s :] + r * gh[:, 2 * s :])
            cells[line][pos] = z * n + (1 - z) * h
    out = torch.stack([torch.stack(line, dim=1) for line in cells])  # (L, B, N, S)
    return out.permute(1, 3, 2, 0) if columns else out.permute(1, 3, 0, 2)


def _time(fn: Callable[[], object], repeats: int) -> float:
    return median_time(fn, repeats)  # one warm-up call, then the median of ``repeats``


def bench_sweep(repeats: int, state_size: int = 150, with_layer: bool = True) -> None:
    torch.manual_seed(0)
    layer = SDN(32, 32, state_size=state_size, directions=(0, 2)).eval()
    x = torch.randn(4, 32, 32, 32)
    with torch.no_grad():
        h = torch.tanh(layer.project_in(x))

        def fast():
            out = h
            for sweep in layer.sweeps:
                out = sweep(out)
            return out

        def slow():
            out = h
            for sweep in layer.sweeps:
                out = loop_sweep(out, sweep)
            return out

        diff = (fast() - slow()).abs().max().item()
        t_fast, t_slow = _time(fast, repeats), _time(slow, max(1, repeats // 2))
        t_layer = _time(lambda: layer(x), repeats)
    print(f"SDN sweeps [0, 2], batch 4, S {state_size}, 32x32 (max |diff| {diff:.1e}):")
    print(f"  per-position loop  {t_slow * 1e3:9.1f} ms")
    print(f"  vectorised         {t_fast * 1e3:9.1f} ms   speed-up x{t_slow / t_fast:.1f}")
    if not with_layer:
        return
    print(f"  whole SDN layer (project in, 2 sweeps, project out) {t_layer * 1e3:.1f} ms")
    xg = x.clone()
    t_fb = _time(lambda: layer(xg).sum().backward(), repeats)
    print(f"  whole SDN layer forward + backward {t_fb * 1e3:.1f} ms")


HIPPO_2D = {"pool_kernels": [[2, 2]] * 3, "conv_kernels": [[3, 3]] * 4}
HIPPO_3D = {"pool_kernels": [[2, 2, 2]] * 3, "conv_kernels": [[3, 3, 3]] * 4}
MODELS = [  # (name, spatial_dims, in, classes, input shape, kwargs, note)
    ("rkseg-l", 2, 1, 3, (56, 40), HIPPO_2D, "Hippocampus 2D plan"),
    ("rkseg-r", 2, 1, 3, (56, 40), HIPPO_2D, "Hippocampus 2D plan"),
    ("rkseg-l", 3, 1, 3, (40, 56, 40), HIPPO_3D, "Hippocampus 3D plan"),
    ("rkseg-r", 3, 1, 3, (40, 56, 40), HIPPO_3D, "Hippocampus 3D plan"),
    ("sdn-unet", 2, 1, 2, (128, 128), {}, "defaults"),
    ("sdn-unetpp", 2, 1, 2, (128, 128), {}, "defaults"),
]


def bench_models(repeats: int) -> None:
    print("CPU forward, eval, no grad, batch 1:")
    for name, dims, cin, classes, shape, kwargs, note in MODELS:
        torch.manual_seed(0)
        model = create_model(name, cin, classes, dims, **kwargs).eval()
        x = torch.randn(1, cin, *shape)
        with torch.no_grad():
            t = _time(lambda model=model, x=x: model(x), repeats)
        size = "x".join(map(str, shape))
        print(
            f"  {name:11s} {dims}D {size:9s} {note:20s} {count_parameters(model):>11,d} params"
            f"  {t * 1e3:9.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_sweep(args.repeats)
    bench_sweep(args.repeats, state_size=16, with_layer=False)  # overhead-bound regime
    bench_models(args.repeats)


if __name__ == "__main__":
    main()
