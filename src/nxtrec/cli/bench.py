"""`nxtrec bench infer`: time our sampler against the reference's algorithm."""

from __future__ import annotations

from nxtrec.cli.options import device, non_negative_int, positive_int


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = kinds.add_parser("infer", help="one-shot inference on random weights: ours vs the no-cache reference algorithm")
    b.add_argument("--preset", default="nxtp-1.78b", help="model size: nxtp-1.78b, nxtp-0.77b, small or tiny (random weights)")
    b.add_argument("--top-k", type=positive_int, default=20, help="one-shot branches per image")
    b.add_argument("--steps", type=non_negative_int, default=3, help="continuation steps after the first top-k step (fixed, so both do the same work)")
    b.add_argument("--batch-size", type=positive_int, default=1, help="images per forward pass")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights and activations")
    b.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:1, ...")
    b.add_argument("--baseline", action="store_true", help="also run the reference's no-cache algorithm and print the speed-up")
    b.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    b.set_defaults(func=run_infer)


def run_infer(args) -> int:
    import torch

    from nxtrec.inference.bench import bench_infer, format_results

    if args.threads:
        torch.set_num_threads(args.threads)
    results = bench_infer(args.preset, args.top_k, args.steps, args.batch_size, args.dtype, args.device, args.baseline)
    print(format_results(results))
    return 0
