"""3D sliding-window inference: ours vs nnU-Net v2's predictor vs MONAI, on the same weights.

Run on demand (not a test; needs the ``bench`` extra: nnunetv2, dynamic-network-architectures, monai)::

    .venv/bin/python benchmarks/bench_inference.py                       # 160^3, patch 128^3
    .venv/bin/python benchmarks/bench_inference.py --size 96 --patch 64 --repeats 3
    .venv/bin/python benchmarks/bench_inference.py --device cuda          # AMP on CUDA

The network is nnU-Net's 3d_fullres U-Net for the patch (widths 32, 64, ... capped at 320, 3x3x3
convs, stride-2 pooling down to a 4-voxel bottleneck). Ours is ``napari_medseg``'s NNUNet; the
baselines run ``dynamic_network_architectures``' PlainConvUNet built with the same configuration,
whose weights are copied from ours by an explicit key mapping; both networks are checked to give
the same output (max |diff| < 1e-4) before anything is timed. All three contenders use the same
volume, tile size, step 0.5, Gaussian weighting, tiles per call and mirroring setting, and are
interleaved (ours, nnU-Net, MONAI, ours, ...); the medians give the ratios (below 1 = faster than the
baseline). The achieved GFLOP/s (network FLOPs of all tile evaluations / time) is reported as a
fraction of the measured FLOP/s of one large conv3d on this machine.

On the CPU, ours runs the channels-last inference forward of ``NNUNet`` (``models/cpu_inference.py``,
taken automatically in eval mode without gradients); ``--stock-forward`` adds our window with the
stock ``nn.Module`` forward as a contender, and ``--levers`` includes it, so that what the window and
what the forward buy can be told apart.

``--compile`` adds our window with ``optimize_predictor(model, compile=True)`` (torch.compile, inductor
freezing) as a fourth contender and prints its compile time. ``--levers`` also times our window with
each other speed lever toggled, against our default.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from types import SimpleNamespace

import torch
from _timing import interleaved, median, report, timed
from torch import nn

from napari_medseg.engine.inference import count_tiles, optimize_predictor, sliding_window
from napari_medseg.models import create_model


# ----------------------------------------------------------------------------- networks
def unet_config(patch: tuple[int, ...], max_pools: int = 5, min_size: int = 4) -> list[list[int]]:
    """nnU-Net-style isotropic pooling: halve every axis while it stays >= ``min_size`` (max 5 pools)."""
    n = 0
    while n < max_pools and all(p % 2 ** (n + 1) == 0 and p // 2 ** (n + 1) >= min_size for p in patch):
        n += 1
    if n == 0:
        raise SystemExit(f"patch {patch} is too small to pool once")
    return [[2] * len(patch) for _ in range(n)]


def build_ours(
    in_ch: int, classes: int, dims: int, pools, base: int, max_width: int, deep_supervision: bool = False
) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(
        "unet-3d-fullres" if dims == 3 else "unet-2d", in_ch, classes, dims,
        pool_kernels=pools, conv_kernels=[[3] * dims] * (len(pools) + 1), base_width=base, max_width=max_width,
        deep_supervision=deep_supervision,
    )
    with torch.no_grad():  # non-trivial norm affines so that a wrong mapping shows
        for m in model.modules():
            if isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def build_plain(ours: nn.Module) -> nn.Module:
    """PlainConvUNet with our model's configuration, weights copied by an explicit key mapping."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    d = ours.spatial_dims
    conv = nn.Conv3d if d == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if d == 3 else nn.InstanceNorm2d
    n_stages = len(ours.widths)
    plain = PlainConvUNet(
        ours.in_channels, n_stages, ours.widths, conv, ours.conv_kernels,
        [[1] * d] + ours.pool_kernels, [2] * n_stages, ours.num_classes, [2] * (n_stages - 1),
        conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"negative_slope": 1e-2, "inplace": True},
        deep_supervision=ours.deep_supervision,
    )
    src = ours.state_dict()
    mapping = {}
    for s in range(n_stages):
        for j in range(2):
            for part, name in ((0, "conv"), (1, "norm")):
                for p in ("weight", "bias"):
                    mapping[f"encoder.stages.{s}.0.convs.{j}.{name}.{p}"] = f"encoder.{s}.{j}.{part}.{p}"
    for lvl in range(n_stages - 1):
        mapping[f"decoder.transpconvs.{lvl}.weight"] = f"upsamples.{lvl}.weight"
        for j in range(2):
            for part, name in ((0, "conv"), (1, "norm")):
                for p in ("weight", "bias"):
                    mapping[f"decoder.stages.{lvl}.convs.{j}.{name}.{p}"] = f"decoder.{lvl}.{j}.{part}.{p}"
    mapping[f"decoder.seg_layers.{n_stages - 2}.weight"] = "head.weight"
    for lvl in range(len(ours.aux_heads)):  # deep supervision: ours coarsest first, as theirs
        mapping[f"decoder.seg_layers.{lvl}.weight"] = f"aux_heads.{lvl}.weight"
    params = dict(plain.named_parameters())  # deduplicated: aliases (all_modules, decoder.encoder) share these
    used = set()
    with torch.no_grad():
        for dst, t in params.items():
            if dst in mapping:
                t.copy_(src[mapping[dst]])
                used.add(mapping[dst])
            elif dst.endswith(".bias") and ("transpconvs" in dst or "seg_layers" in dst):
                t.zero_()  # ours has no bias there
            elif "seg_layers" in dst:
                t.zero_()  # deep-supervision heads, unused without deep supervision
            else:
                raise SystemExit(f"no mapping for PlainConvUNet parameter {dst}")
    missing = set(src) - used
    if missing:
        raise SystemExit(f"our parameters not mapped: {sorted(missing)}")
    return plain.eval()


def unwrap(out):
    """The full-resolution output of a network (the first of a deep-supervision list)."""
    return out[0] if isinstance(out, (list, tuple)) else out


def assert_same(ours: nn.Module, plain: nn.Module, patch, in_ch: int) -> float:
    """Max |ours - PlainConvUNet| on one input, relative to the output's scale (must be < 1e-4).

    In eval mode on the CPU ours runs its channels-last inference forward (models/cpu_inference.py),
    whose float32 rounding differs from the stock graph's; the stock forward is checked too.
    """
    x = torch.randn(1, in_ch, *patch, generator=torch.Generator().manual_seed(1))
    diffs = []
    for fast in (False, True):
        for m in ours.modules():
            if hasattr(m, "cpu_fast_path"):
                m.cpu_fast_path = fast
        with torch.inference_mode():
            a, b = ours(x), plain(x)
            if isinstance(a, (list, tuple)):  # deep supervision: every output must match
                assert len(a) == len(b), f"ours gives {len(a)} outputs, PlainConvUNet {len(b)}"
                diff = max((u - v).abs().max().item() / max(1.0, v.abs().max().item()) for u, v in zip(a, b))
            else:
                diff = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        assert diff < 1e-4, f"ours and PlainConvUNet differ by {diff} on the same input: the weight mapping is wrong"
        diffs.append(diff)
    return max(diffs)


def network_flops(model: nn.Module, patch, in_ch: int) -> float:
    """FLOPs of one forward on one patch (conv/transposed-conv/matmul, counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.empty(1, in_ch, *patch, device="meta"))
    return float(counter.get_total_flops())


def conv3d_peak(device: torch.device, repeats: int) -> float:
    """Measured FLOP/s of one large conv3d (64 -> 64 channels, 3x3x3, on 64^3; float32 or AMP on CUDA)."""
    conv = nn.Conv3d(64, 64, 3, padding=1).to(device).eval()
    x = torch.randn(1, 64, 64, 64, 64, device=device)
    flops = 2 * 64 * 64 * 27 * 64**3

    def run():
        with torch.inference_mode(), torch.autocast("cuda", enabled=device.type == "cuda"):
            conv(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return flops / median([timed(run)[0] for _ in range(repeats + 1)][1:])


# ----------------------------------------------------------------------------- contenders
def run_ours(model, image, patch, classes, args, device, **levers):
    def call():
        gen = sliding_window(
            model, image, patch, classes, step=0.5, batch_size=args.batch_size, mirror_axes=args.mirror_axes,
            device=device, accumulate_device=device, **levers,
        )
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                out = stop.value
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def nnunet_predictor(plain, patch, classes, args, device):
    import contextlib
    import io

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a CPU notice
        pred = nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=bool(args.mirror_axes),
            perform_everything_on_device=device.type == "cuda", device=device, verbose=False, allow_tqdm=False,
        )
    # Set up without plans files: the sliding window reads only these attributes.
    pred.network = plain.to(device)
    pred.configuration_manager = SimpleNamespace(patch_size=list(patch))
    pred.label_manager = SimpleNamespace(num_segmentation_heads=classes)
    pred.allowed_mirroring_axes = tuple(args.mirror_axes) if args.mirror_axes else None
    pred.list_of_parameters = [plain.state_dict()]
    return pred


def run_nnunet(pred, image, device):
    def call():
        out = pred.predict_sliding_window_return_logits(image)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def run_monai(plain, image, patch, args, device, slicewise: bool = False):
    """MONAI's ``sliding_window_inference``; ``slicewise``: a 2D ``patch`` over (1, y, x) windows."""
    from monai.inferers import sliding_window_inference

    def predictor(x):
        if slicewise:  # (B, C, 1, p, p) windows -> the 2D network -> back to 3D
            x = x[:, :, 0]
        out = plain(x)
        if args.mirror_axes:  # the same flip TTA as the others, inside the predictor
            import itertools

            axes = [a + 2 for a in args.mirror_axes]
            combos = [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]
            for c in combos:
                out = out + plain(x.flip(c)).flip(c)
            out = out / (len(combos) + 1)
        return out[:, :, None] if slicewise else out

    window = (1, *patch) if slicewise else patch

    def call():
        with torch.inference_mode(), torch.autocast("cuda", enabled=device.type == "cuda"):
            out = sliding_window_inference(
                image[None].to(device), window, args.batch_size, predictor, overlap=0.5, mode="gaussian",
                sigma_scale=0.125, sw_device=device, device=device,
            )[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def warm_up_and_compare(contenders) -> None:
    """Run every contender once (the warm-up) and print how far each one's logits are from ours."""
    outs = {name: fn() for name, fn in contenders.items()}
    for name, out in outs.items():
        if name != "ours":
            ref, other = outs["ours"].float().cpu(), out.float().cpu()
            agree = (ref.argmax(0) == other.argmax(0)).float().mean().item()
            print(f"  agreement ours vs {name}: max |logit diff| {(ref - other).abs().max().item():.2e}, "
                  f"argmax equal on {agree * 100:.3f}% of voxels")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs="+", default=[160], help="volume edge (or z y x), default 160")
    p.add_argument("--patch", type=int, nargs="+", default=[128], help="tile edge (or z y x), default 128")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--base-width", type=int, default=32)
    p.add_argument("--max-width", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=1, help="tiles per network call (all contenders)")
    p.add_argument("--mirror", action="store_true", help="mirroring TTA over all 3 axes (8x the work)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (AMP on CUDA)")
    p.add_argument("--levers", action="store_true", help="also time our window with each lever toggled")
    p.add_argument("--stock-forward", action="store_true",
                   help="add our window with the stock nn.Module forward (no channels-last CPU forward)")
    p.add_argument("--compile", action="store_true", help="add ours + torch.compile as a contender (slow to build)")
    p.add_argument("--skip", nargs="*", default=[], choices=["nnunet", "monai"], help="leave baselines out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = tuple(args.size * 3 if len(args.size) == 1 else args.size)
    patch = tuple(args.patch * 3 if len(args.patch) == 1 else args.patch)
    args.mirror_axes = (0, 1, 2) if args.mirror else ()
    pools = unet_config(patch)

    ours = build_ours(1, args.classes, 3, pools, args.base_width, args.max_width)
    plain = build_plain(ours)
    diff = assert_same(ours, plain, patch, 1)
    ours, plain = ours.to(device), plain.to(device)
    image = torch.randn(1, *size, generator=torch.Generator().manual_seed(2)).to(device)
    tiles = count_tiles(size, patch, 0.5, args.mirror_axes)
    flops_tile = network_flops(ours, patch, 1)

    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print(f"volume {'x'.join(map(str, size))}, patch {'x'.join(map(str, patch))}, step 0.5, Gaussian (sigma 1/8), "
          f"{'mirroring over 3 axes' if args.mirror else 'no mirroring'}, {args.batch_size} tile(s) per call, "
          f"{'AMP float16' if device.type == 'cuda' else 'float32'}: {tiles} tile evaluations per pass")
    print(f"network: 3d_fullres U-Net widths {ours.widths}, {len(pools)} pools, {args.classes} classes, "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M params, "
          f"{flops_tile / 1e9:.1f} GFLOP per tile; ours vs PlainConvUNet max |diff| / max |output| {diff:.1e}")

    contenders = {"ours": run_ours(ours, image, patch, args.classes, args, device)}
    if args.stock_forward:  # our window with the stock nn.Module forward: what the window alone buys
        contenders["ours-stock-fwd"] = run_ours(stock_forward(ours), image, patch, args.classes, args, device)
    if args.compile:  # the optional lever: torch.compile with inductor freezing, compile time reported
        compiled = optimize_predictor(copy.deepcopy(ours), compile=True)
        run_compiled = run_ours(compiled, image, patch, args.classes, args, device)
        seconds, _ = timed(run_compiled)
        print(f"  torch.compile (inductor, freezing): first pass = compile + run {seconds:.1f} s")
        contenders["ours+compile"] = run_compiled
    if "nnunet" not in args.skip:
        contenders["nnunet"] = run_nnunet(nnunet_predictor(plain, patch, args.classes, args, device), image, device)
    if "monai" not in args.skip:
        contenders["monai"] = run_monai(plain, image, patch, args, device)
    warm_up_and_compare(contenders)
    cpu: dict[str, list[float]] = {}
    times = interleaved(
        contenders, args.repeats, warmup=0,
        on_repeat=lambda r, n, dt: print(f"  repeat {r + 1} {n:12s} {dt:8.2f} s", flush=True), cpu_times=cpu,
    )
    peak = conv3d_peak(device, 3)
    baseline = "nnunet" if "nnunet" in times else "ours"
    print(f"results (median of {args.repeats}, per-repeat times in brackets):")
    report(times, baseline)
    print("process CPU time (all threads; less sensitive to other processes' load):")
    report(cpu, baseline)
    for name, values in times.items():
        rate = tiles * flops_tile / median(values)
        print(f"  {name:8s} {rate / 1e9:7.1f} GFLOP/s = {rate / peak:.2f} of one large conv3d "
              f"({peak / 1e9:.1f} GFLOP/s measured)")
    for mine in [n for n in times if n.startswith("ours")]:
        for name in [n for n in times if not n.startswith("ours")]:
            print(f"RATIO {mine} / {name} = {median(times[mine]) / median(times[name]):.3f}")

    if args.levers:
        lever_table(ours, image, patch, args, device)


def stock_forward(model: nn.Module) -> nn.Module:
    """A copy of our model that always runs the stock nn.Module forward (cpu_fast_path off)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if hasattr(m, "cpu_fast_path"):
            m.cpu_fast_path = False
    return model


def lever_table(model, image, patch, args, device) -> None:
    """Time our window with each lever changed from the default, interleaved with the default."""
    variants = {"default": run_ours(model, image, patch, args.classes, args, device)}
    if device.type == "cpu":
        variants["stock forward (no CL fast path)"] = run_ours(
            stock_forward(model), image, patch, args.classes, args, device
        )
    variants["channels_last_3d"] = run_ours(
        optimize_predictor(copy.deepcopy(model), channels_last=True), image, patch, args.classes, args, device,
        channels_last=True,
    )
    b = SimpleNamespace(**{**vars(args), "batch_size": 2 * args.batch_size})
    variants[f"{2 * args.batch_size} tiles per call"] = run_ours(model, image, patch, args.classes, b, device)
    variants["float16 accumulator"] = run_ours(
        model, image, patch, args.classes, args, device, accumulate_dtype=torch.float16
    )
    threads = torch.get_num_threads()
    if threads > 1:
        inner = run_ours(model, image, patch, args.classes, args, device)

        def one_thread():
            torch.set_num_threads(threads // 2)
            try:
                return inner()
            finally:
                torch.set_num_threads(threads)

        variants[f"{threads // 2} thread(s) instead of {threads}"] = one_thread
    ref = variants["default"]()
    for name, fn in variants.items():  # warm-up, and the result must not change
        if name != "default":
            diff = (fn().float() - ref.float()).abs().max().item()
            print(f"  lever {name}: max |logit diff| to default {diff:.1e}")
    cpu: dict[str, list[float]] = {}
    times = interleaved(variants, args.repeats, warmup=0,
                        on_repeat=lambda r, n, dt: print(f"  repeat {r + 1} {n:28s} {dt:8.2f} s", flush=True),
                        cpu_times=cpu)
    print("levers (our window, each against our default in the same run; below 1 = the lever helps):")
    report(times, "default")
    print("process CPU time:")
    report(cpu, "default")


if __name__ == "__main__":
    main()
