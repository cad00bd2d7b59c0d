"""Engine throughput on the CPU: plain forward vs ODIN (batched, per-image) and what each change buys;
and the cost of scoring every registered method against ODIN alone (same run, ratio).

    python -m benchmarks.engine_throughput [--data ../shared/data] [--images 2048] [--repeats 5]

Every-method variants (``OdinScorer.score`` on uint8 images, so both sides pay the same
conversion): ``methods=["odin"]`` (today's ODIN-only scoring) vs the default set (what ``score``
and ``audit`` compute: every method but AdaSCALE) without and with a fit whose KNN bank holds
``--bank`` rows (the fit's features tiled: a bank of that size costs the same), and all 13
(``methods=["all"]``: AdaSCALE's perturbed input is the one extra forward). The FLOPs of one
batch's scoring pass with and without AdaSCALE are counted too (``torch.utils.flop_counter``).

ResNet-20, batch 256, one process. Each variant is timed ``--repeats`` times, interleaved
with the others (the machine is noisy); the median is reported (``--clock cpu``: process CPU
time instead of wall time, steadier on a shared machine with ``--threads 1``). Every variant is given as a
ratio against two forward passes measured in the same run: the model *as loaded* (plain) and
the *equally optimized* model (BN folded, channels-last — what ``OdinScorer`` itself runs). The
second is the stricter figure (ODIN's own overhead, not the optimizations'), and the one to quote.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import odin_engine as oe
from odin_engine.models.cifar_resnet import CifarResNet
from odin_engine.odin import odin_scores
from odin_engine.optimize import fold_batchnorm


def _model(data: Path | None) -> oe.LoadedModel:
    weights = data / "weights" / "resnet20-12fca82f.th" if data else None
    if weights and weights.is_file():
        return oe.load_model("cifar_resnet20", weights)
    torch.manual_seed(0)
    m = CifarResNet(20).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return oe.LoadedModel(m, oe.IMAGENET_MEAN, oe.IMAGENET_STD, 10, 32, "cifar_resnet20@random", "cifar_resnet20")


def _images(data: Path | None, n: int) -> np.ndarray:
    path = data / "cifar10_test_jpeg_yoongikim.npz" if data else None
    if path and path.is_file():
        return np.load(path)["images"][:n]
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--per-image", type=int, default=256, help="images for the batch-1 loop")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to build on CPU)")
    ap.add_argument("--no-methods", action="store_true", help="skip the every-method variants")
    ap.add_argument("--methods-only", action="store_true",
                    help="time only the two forwards and the every-method variants (a shorter run)")
    ap.add_argument("--bank", type=int, default=50_000, help="KNN bank rows for the every-method variants")
    ap.add_argument("--fit-images", type=int, default=512, help="images the every-method variants' fit sees")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, the work itself: "
                         "steadier than wall time on a machine shared with other jobs)")
    ap.add_argument("--profile", action="store_true",
                    help="with the every-method variants: also print where one batch's time goes (the scoring pass "
                         "with and without AdaSCALE's forward, each method's own math, KNN's product and top-k)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = args.data if args.data.is_dir() else None
    loaded = _model(data)
    imgs = _images(data, args.images)
    bs, T, eps = args.batch_size, 1000.0, 0.0014
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    std = torch.tensor(loaded.std, device=dev)
    unit = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().to(dev) / 255
    x_all = (unit - torch.tensor(loaded.mean, device=dev).view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    chunks = list(x_all.split(bs))
    cl_chunks = [c.contiguous(memory_format=torch.channels_last) for c in chunks]

    plain = loaded.module.to(dev)
    folded = fold_batchnorm(plain)
    plain_cl = CifarResNet(20).eval()
    plain_cl.load_state_dict(plain.state_dict())
    for p in plain_cl.parameters():
        p.requires_grad_(False)
    plain_cl = plain_cl.to(dev, memory_format=torch.channels_last)
    folded_cl = fold_batchnorm(plain).to(memory_format=torch.channels_last)

    def forward(module, xs):
        def run():
            with torch.inference_mode():
                for x in xs:
                    module(x)
            sync()
        return run

    def odin(module, xs):
        def run():
            for x in xs:
                odin_scores(module, x, std, T, eps)
            sync()
        return run

    per_image_x = x_all[: args.per_image]

    def per_image_loop():
        for i in range(per_image_x.shape[0]):
            odin_scores(plain, per_image_x[i : i + 1], std, T, eps)
        sync()

    n = x_all.shape[0]
    variants = {
        "plain forward (model as loaded, NCHW)": (forward(plain, chunks), n),
        "forward, BN folded + channels-last": (forward(folded_cl, cl_chunks), n),
        "ODIN naive batched (as loaded, NCHW)": (odin(plain, chunks), n),
        "ODIN + channels-last": (odin(plain_cl, cl_chunks), n),
        "ODIN + BN folding": (odin(folded, chunks), n),
        "ODIN + BN folding + channels-last (OdinScorer)": (odin(folded_cl, cl_chunks), n),
        "ODIN per-image loop (batch 1, as loaded)": (per_image_loop, per_image_x.shape[0]),
    }
    if args.methods_only:
        variants = {k: v for k, v in variants.items() if k.startswith(("plain forward", "forward, BN"))}
    if not args.no_methods:
        import dataclasses

        from odin_engine.detectors.reference import fit_images
        from odin_engine.methods import TABLE_METHODS

        fit = fit_images(loaded, imgs[:args.fit_images], temperature=T, device=dev, batch_size=bs)
        reps = -(-args.bank // fit.bank.shape[0])
        fit = dataclasses.replace(fit, bank=np.tile(fit.bank, (reps, 1))[:args.bank])
        only = oe.OdinScorer(loaded, T, eps, device=dev, batch_size=bs, methods=["odin"])
        every = oe.OdinScorer(loaded, T, eps, device=dev, batch_size=bs, fit=fit, methods=["all"])
        no_ada = oe.OdinScorer(loaded, T, eps, device=dev, batch_size=bs, fit=fit)  # the default set
        no_fit = oe.OdinScorer(loaded, T, eps, device=dev, batch_size=bs)
        assert every.methods == list(TABLE_METHODS) and "adascale" not in no_ada.methods
        flops = _pass_flops(every, imgs[:bs])
        if args.profile:
            _profile(every, imgs[:bs], args.repeats, time.process_time if args.clock == "cpu" else time.perf_counter)

        def scorer(sc):
            def run():
                sc.score(imgs)
                sync()
            return run

        variants["OdinScorer, ODIN only (methods=['odin'])"] = (scorer(only), n)
        variants[f"OdinScorer, all 13 methods (methods=['all'], fit, bank {args.bank:,})"] = (scorer(every), n)
        variants[f"OdinScorer, default set (12: all but adascale; fit, bank {args.bank:,})"] = (scorer(no_ada), n)
        variants["OdinScorer, default set without a fit (7 methods)"] = (scorer(no_fit), n)
    if args.compile:
        compiled = torch.compile(folded_cl)
        odin(compiled, cl_chunks[:1])()  # build outside the timing
        variants["ODIN + BN folding + channels-last + torch.compile"] = (odin(compiled, cl_chunks), n)

    for fn, _ in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for _ in range(args.repeats):
        for name, (fn, _) in variants.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)

    rates = {k: variants[k][1] / statistics.median(v) for k, v in times.items()}
    base = rates["plain forward (model as loaded, NCHW)"]
    fast = rates["forward, BN folded + channels-last"]
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}, batch {bs}, images {n}, "
          f"median of {args.repeats} ({args.clock} clock), model {loaded.model_id}")
    print("| variant | images/s | × plain forward | × optimized forward |")
    print("|---|---:|---:|---:|")
    for name, r in rates.items():
        print(f"| {name} | {r:,.0f} | {r / base:.3f} | {r / fast:.3f} |")
    engine = rates.get("ODIN + BN folding + channels-last (OdinScorer)")
    if engine:
        print(f"ODIN (OdinScorer) runs at {engine / fast:.3f}× the equally optimized forward (stricter) and "
              f"{engine / base:.3f}× the plain forward.")
    if not args.no_methods:
        only = rates["OdinScorer, ODIN only (methods=['odin'])"]
        for name in [k for k in rates if k.startswith("OdinScorer, ") and "ODIN only" not in k]:
            print(f"{name}: cost {only / rates[name]:.3f}× ODIN-only scoring (time ratio, same run)")
        print(f"FLOPs per image of the scoring pass: ODIN {flops['odin'] / 1e6:.1f} M, with AdaSCALE's perturbed "
              f"forward {flops['adascale'] / 1e6:.1f} M ({flops['adascale'] / flops['odin']:.3f}×; one plain forward "
              f"{flops['forward'] / 1e6:.1f} M)")


def _profile(scorer, imgs, repeats: int, clock) -> None:
    """Milliseconds per batch (median of ``repeats``) of the parts of scoring every method."""
    from odin_engine.detectors.passes import run_pass
    from odin_engine.methods import REGISTRY, _cached

    x = next(scorer.batches(imgs))
    std = scorer.std.flatten()

    def ms(fn) -> float:
        fn()
        ts = []
        for _ in range(repeats):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
        return statistics.median(ts) * 1e3

    kw = dict(temperature=scorer.temperature, epsilon=scorer.epsilon, head=scorer.head, fit=scorer.fit)
    parts = {"scoring pass (ODIN: forward + input gradient + perturbed forward, h hooked)":
             ms(lambda: run_pass(scorer.module, x, std, **kw)),
             "scoring pass with AdaSCALE's perturbed forward": ms(lambda: run_pass(scorer.module, x, std, **kw,
                                                                                     adascale=True))}
    p = scorer.run_pass(x)
    for name in scorer.methods:
        parts[f"method {name} (its math on the pass)"] = ms(lambda: REGISTRY[name].score(p))
    q = torch.nn.functional.normalize(p.h, dim=1)
    bank = _cached(scorer.fit, "bank", p.h.device)
    sims = q @ bank.t()
    parts[f"knn: similarity {len(q)} × {bank.shape[0]:,} × {bank.shape[1]}"] = ms(lambda: q @ bank.t())
    parts["knn: top-50 of each row"] = ms(lambda: torch.topk(sims, 50, dim=1))
    parts["knn: kthvalue instead of top-k"] = ms(lambda: torch.kthvalue(sims, sims.shape[1] - 49, dim=1))
    print(f"where one batch of {len(x)} goes (ms of the {'CPU' if clock is time.process_time else 'wall'} clock, "
          f"median of {repeats}):")
    for name, t in parts.items():
        print(f"  {name}: {t:.2f}")


def _pass_flops(scorer, imgs) -> dict[str, float]:
    """FLOPs per image (``torch.utils.flop_counter``'s formulas for convolutions and matrix products,
    backward included) of one forward, ODIN's scoring pass, and the pass with AdaSCALE's forward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    from odin_engine.detectors.passes import run_pass

    class Count(TorchDispatchMode):  # FlopCounterMode's module hooks refuse autograd.grad on the input
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            packet = func._overloadpacket
            if packet in (torch.ops.aten.conv2d, torch.ops.aten.linear):  # inference_mode: not decomposed
                self.total += 2 * out.numel() * args[1].shape[1:].numel()
            elif packet in flop_registry:
                self.total += flop_registry[packet](*args, **kwargs, out_val=out)
            return out

    x = next(scorer.batches(imgs))
    std = scorer.std.flatten()

    def forward():
        with torch.inference_mode():
            scorer.module(x)

    runs = {"forward": forward,
            "odin": lambda: run_pass(scorer.module, x, std, temperature=scorer.temperature, epsilon=scorer.epsilon,
                                     head=scorer.head),
            "adascale": lambda: run_pass(scorer.module, x, std, temperature=scorer.temperature,
                                         epsilon=scorer.epsilon, head=scorer.head, adascale=True)}
    out = {}
    for name, fn in runs.items():
        with Count() as counter:
            fn()
        out[name] = counter.total / x.shape[0]
    return out


if __name__ == "__main__":
    main()
