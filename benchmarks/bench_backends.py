"""The torch backend side by side with the other sparse-convolution libraries, in one run.

    python benchmarks/bench_backends.py                       # 5k 10k 20k 60k points, ratios 0.25 and 1, 2 threads
    python benchmarks/bench_backends.py --points 10000 --ratios 0.25 --repeats 7
    python benchmarks/bench_backends.py --backward            # also forward + backward (training)
    python benchmarks/bench_backends.py --paths               # table vs batched pairs per layer (sparse._use_table)

Inputs: the shared real SemanticKITTI scan prepared as the pipeline feeds the denoiser
(``bench_denoiser.make_inputs``: n/10 scan points, x10, plus unit noise), at the shipped
model's widths (channel ratio 0.25) and full width (1). Every backend runs the same
networks, weights and points (``lidar_completion.backends``): ``torch`` (float32),
``torch-bf16`` (the same, GEMMs in bfloat16), ``spconv`` (2.3, ``scripts/install_spconv.sh``)
and ``minkowski`` (MinkowskiEngine 0.5.4, ``scripts/install_minkowski.sh``); a library that is
not installed gets a "not installed" column. Backends take turns, round after round, so a
shared machine's drift lands on all of them; each figure is "min / median" ms over the rounds.

Rows: the whole encoder + denoiser forward, and its time per layer kind, exclusive of what
the kind calls: ``maps`` (kernel maps / spconv's indice pairs), ``k3 submanifold``,
``k2 s2 down``, ``k2 s2 transpose``, ``k1`` and ``rest`` (BatchNorm, ReLU, the conditioning
MLPs and nearest-voxel search, voxelisation: everything that is not a convolution). With
``--backward``, a row for forward + backward of ``mean(output^2)`` (all parameters).
Ratios: each torch backend's median over the fastest other library's median.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_denoiser import make_inputs  # noqa: E402

OURS = ("torch", "torch-bf16")
OTHERS = ("spconv", "minkowski")
KINDS = ("maps", "k3 submanifold", "k2 s2 down", "k2 s2 transpose", "k1", "rest")


def installed(name: str) -> bool:
    if name == "spconv":
        from lidar_completion import spconv_backend

        return spconv_backend.available()
    if name == "minkowski":
        from lidar_completion import minkowski

        return minkowski.available()
    if name == "torch-bf16":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return True


class KindTimer:
    """Exclusive wall time per layer kind: patches the backends' convolution and map methods
    (a kind's time excludes the kinds it calls, e.g. a convolution's first map build)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._stack: list[list] = []

    @contextlib.contextmanager
    def kind(self, name: str):
        frame = [name, time.perf_counter(), 0.0]  # name, start, time spent in nested kinds
        self._stack.append(frame)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - frame[1]
            self._stack.pop()
            self.totals[name] = self.totals.get(name, 0.0) + elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def wrap(self, owner, attr: str, name_of):
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            with self.kind(name_of(*args, **kwargs)):
                return original(*args, **kwargs)

        setattr(owner, attr, wrapped)
        return owner, attr, original

    @contextlib.contextmanager
    def patched(self):
        from lidar_completion import sparse

        def conv_kind(self_, x, kernel, kernel_size, stride):
            return {1: "k1", 2: "k2 s2 down"}.get(kernel_size, "k3 submanifold")

        targets = [(sparse.CoordinateManager, "convolve", conv_kind),
                   (sparse.CoordinateManager, "convolve_transpose", lambda *a, **k: "k2 s2 transpose"),
                   (sparse.CoordinateManager, "submanifold_map", lambda *a, **k: "maps"),
                   (sparse.CoordinateManager, "downsample_map", lambda *a, **k: "maps")]
        if installed("spconv"):
            from lidar_completion import spconv_backend

            targets += [(spconv_backend.SpconvCoordinates, "convolve", conv_kind),
                        (spconv_backend.SpconvCoordinates, "convolve_transpose", lambda *a, **k: "k2 s2 transpose"),
                        (spconv_backend.SpconvCoordinates, "_indice_pairs", lambda *a, **k: "maps")]
        if installed("minkowski"):
            from lidar_completion import minkowski

            # MinkowskiEngine builds its kernel maps inside its convolution calls: "maps" stays 0.
            targets += [(minkowski.MinkowskiCoordinates, "convolve", conv_kind),
                        (minkowski.MinkowskiCoordinates, "convolve_transpose", lambda *a, **k: "k2 s2 transpose")]
        saved = [self.wrap(*t) for t in targets]
        try:
            yield self
        finally:
            for owner, attr, original in saved:
                setattr(owner, attr, original)


def networks(ratio: float):
    from lidar_completion.networks import Denoiser, ScanEncoder

    torch.manual_seed(0)  # the same weights for every backend
    return ScanEncoder(ratio).eval(), Denoiser(ratio).eval()


def forward(nets, inputs, backend: str) -> torch.Tensor:
    from lidar_completion.backends import voxelize

    encoder, denoiser = nets
    part, noisy, t = inputs
    scan = encoder(voxelize(part, None, 0.05, backend=backend))
    return denoiser(voxelize(noisy, None, 0.05, backend=backend), scan, t)


def measure(nets, inputs, backends: list[str], rounds: int, backward: bool) -> dict[str, dict[str, list[float]]]:
    """Per backend: seconds per round of the whole forward, per kind, and forward+backward."""
    results = {b: {"forward": [], **{k: [] for k in KINDS}, "forward+backward": []} for b in backends}
    timer = KindTimer()
    for backend in backends:  # warm-up (first-call costs, one-off imports)
        with torch.inference_mode():
            forward(nets, inputs, backend)
    with timer.patched():
        for _ in range(rounds):
            for backend in backends:
                timer.totals.clear()
                with torch.inference_mode():
                    start = time.perf_counter()
                    forward(nets, inputs, backend)
                    total = time.perf_counter() - start
                row = results[backend]
                row["forward"].append(total)
                for kind in KINDS[:-1]:
                    row[kind].append(timer.totals.get(kind, 0.0))
                row["rest"].append(total - sum(timer.totals.values()))
    if backward:
        for _ in range(max(1, rounds // 2)):
            for backend in backends:
                for net in nets:
                    net.zero_grad(set_to_none=True)
                start = time.perf_counter()
                forward(nets, inputs, backend).square().mean().backward()
                results[backend]["forward+backward"].append(time.perf_counter() - start)
    return results


def cell(values: list[float]) -> str:
    return f"{1000 * min(values):.0f} / {1000 * statistics.median(values):.0f}" if values else "-"


def ratio_cell(ours: list[float], others: list[list[float]]) -> str:
    others = [o for o in others if o]
    if not ours or not others:
        return "-"
    best = min(statistics.median(o) for o in others)
    return f"{statistics.median(ours) / best:.2f}" if best > 0 else "-"


def backend_table(args) -> None:
    from lidar_completion.backends import voxelize

    available = [b for b in (*OURS, *OTHERS) if installed(b)]
    missing = [b for b in (*OURS, *OTHERS) if b not in available]
    others = [b for b in OTHERS if b in available]
    header = ["ratio", "points", "voxels", "row", *[f"{b} ms" for b in (*OURS, *OTHERS)],
              *[f"{b} / fastest other" for b in OURS if b in available]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; min / median ms over {args.rounds} "
          f"interleaved rounds; not installed: {', '.join(missing) or 'none'}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for ratio in args.ratios:
        nets = networks(ratio)
        for points in args.points:
            part, noisy = make_inputs(points)
            inputs = (part, noisy, torch.tensor([500]))
            voxels = voxelize(noisy, None, 0.05).sparse.feats.shape[0]
            with torch.inference_mode():  # the same numbers on every backend
                reference = forward(nets, inputs, "torch")
                for backend in available[1:]:
                    diff = (forward(nets, inputs, backend) - reference).abs().max().item()
                    limit = 0.05 * reference.abs().max().item() if backend == "torch-bf16" else 1e-3
                    if diff > limit:
                        raise SystemExit(f"{backend} differs from torch by {diff:g} at ratio {ratio}, {points} points")
            results = measure(nets, inputs, available, args.rounds, args.backward)
            rows = ["forward", *KINDS] + (["forward+backward"] if args.backward else [])
            for row in rows:
                cells = [cell(results[b][row]) if b in results else "not installed" for b in (*OURS, *OTHERS)]
                ratios = [ratio_cell(results[b][row], [results[o][row] for o in others]) for b in OURS if b in available]
                print(f"| {ratio:g} | {points} | {voxels} | {row} | " + " | ".join(cells + ratios) + " |", flush=True)


def path_table(args) -> None:
    """Table GEMM vs batched pairs for every submanifold layer the denoiser runs (the
    choice ``sparse._use_table`` makes), float32 and bfloat16."""
    from lidar_completion import sparse

    print("| ratio | points | stride | in -> out | fill | f32 pairs ms | f32 table ms | bf16 pairs ms | bf16 table ms | chosen f32 / bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ratio in args.ratios:
        nets = networks(ratio)
        for points in args.points:
            part, noisy = make_inputs(points)
            layers: dict[tuple, tuple] = {}
            original = sparse.CoordinateManager.convolve

            def record(self, x, kernel, kernel_size, stride):
                if kernel_size == 3:
                    layers.setdefault((x.stride, kernel.shape[1], kernel.shape[2]), (self, x.stride, x.feats))
                return original(self, x, kernel, kernel_size, stride)

            sparse.CoordinateManager.convolve = record
            try:
                with torch.inference_mode():
                    forward(nets, (part, noisy, torch.tensor([500])), "torch")
            finally:
                sparse.CoordinateManager.convolve = original
            for (stride, cin, cout), (manager, _, feats) in sorted(layers.items()):
                kmap = manager.submanifold_map(stride, 3)
                kernel = torch.randn(27, cin, cout) / (27 * cin) ** 0.5
                times = {}
                for dtype in (torch.float32, torch.bfloat16):
                    f, w = feats.to(dtype), kernel.to(dtype)
                    for path, run in (("pairs", lambda: sparse._convolve(f, kmap, w)),
                                      ("table", lambda: sparse._convolve_table(f, kmap.table, w))):
                        run()
                        samples = []
                        for _ in range(args.repeats):
                            start = time.perf_counter()
                            run()
                            samples.append(time.perf_counter() - start)
                        times[dtype, path] = statistics.median(samples) * 1000
                fill = kmap.num_pairs / max(1, 27 * kmap.num_out)
                chosen = " / ".join("table" if sparse._use_table(kmap, cin, cout, d) else "pairs"
                                    for d in (torch.float32, torch.bfloat16))
                print(f"| {ratio:g} | {points} | {stride} | {cin} -> {cout} | {fill:.2f} | "
                      + " | ".join(f"{times[d, p]:.2f}" for d in (torch.float32, torch.bfloat16) for p in ("pairs", "table"))
                      + f" | {chosen} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--points", type=int, nargs="+", default=[5000, 10000, 20000, 60000])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each backend once per round)")
    parser.add_argument("--repeats", type=int, default=7, help="--paths: runs per layer and path (median)")
    parser.add_argument("--backward", action="store_true", help="also time forward + backward (training)")
    parser.add_argument("--paths", action="store_true", help="table vs pairs per submanifold layer instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (path_table if args.paths else backend_table)(args)


if __name__ == "__main__":
    main()
