"""`nxtrec tag INPUT... --out DIR [--model DIR | --onnx DIR]`: tag a whole collection into
part files, resumably (see nxtrec.tagging)."""

from __future__ import annotations

import os
import sys

from nxtrec.cli.adapter_options import add_adapter_argument
from nxtrec.cli.options import (
    existing_dir,
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
)
from nxtrec.cli.confidence_options import add_confidence_arguments
from nxtrec.cli.vocab_options import add_vocab_arguments
from nxtrec.data.xmp import SIDECAR_NAMES
from nxtrec.errors import NxtrecError


def register(sub) -> None:
    p = sub.add_parser("tag", help="tag a whole collection of images into an output folder (resumable)")
    p.add_argument("inputs", nargs="*", help="image files, folders (recursive) and globs")
    p.add_argument("--out", help="output folder (parts, errors.jsonl, manifest.json)")
    p.add_argument("--list", dest="list_file", metavar="FILE", help="file with one image path per line ('-': stdin)")
    p.add_argument("--shards", action="append", default=[], metavar="PATTERN",
                   help="WebDataset / img2dataset tars, e.g. 'dir/{00000..00123}.tar' (sample keys are the ids)")
    p.add_argument("--model", help="model directory (default: the bundled default model)")
    p.add_argument("--onnx", metavar="DIR", type=existing_dir, help="run an exported ONNX directory with ONNX Runtime (no PyTorch)")
    p.add_argument("--top-k", type=positive_int, default=10, help="one-shot branches, and the most labels per image")
    p.add_argument("--extra-k", type=non_negative_int, default=0, help="extra branches sampled beyond --top-k")
    p.add_argument("--ranking", default="prob", choices=["prob", "ppl", "sim", "none"],
                   help="order of the labels: probability, perplexity, image similarity, generation order")
    p.add_argument("--min-prob", type=fraction, default=0.0, help="drop labels with a lower probability")
    p.add_argument("--max-labels", type=positive_int, help="keep at most this many labels per image (after --min-prob)")
    p.add_argument("--format", dest="fmt", default="jsonl", choices=["jsonl", "csv", "parquet", "xmp", "hf"],
                   help="part files: one JSON record per image, or id,label,prob rows, or Parquet; xmp: JSONL parts "
                        "and an XMP sidecar beside each image; hf: JSONL parts and the imagefolder's metadata.jsonl "
                        "(docs/formats.md)")
    p.add_argument("--xmp-name", default="image", choices=SIDECAR_NAMES,
                   help="--format xmp: sidecar photo.jpg.xmp (digiKam, darktable) or photo.xmp (Lightroom)")
    p.add_argument("--xmp-parent", default="nxtrec", help="--format xmp: parent of nxtrec's hierarchical keywords")
    p.add_argument("--maps", action="store_true",
                   help="store each label's map over the image patch grid in the records (jsonl, PyTorch path)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    p.add_argument("--part-size", type=positive_int, default=1000, help="images per part file")
    # Decoding costs a few percent of the model's time: half the cores (1 to 4) keep up
    # without taking many cores from the model.
    p.add_argument("--workers", type=positive_int, default=max(1, min(4, (os.cpu_count() or 2) // 2)),
                   help="image decoding processes")
    p.add_argument("--processes", type=positive_int, default=1,
                   help="ranks on this machine, each with every N-th part on cores/N threads or $OMP_NUM_THREADS "
                        "(CPU: faster than one process with N times the threads; --device cuda: one GPU each)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (torchrun: each rank its own GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"],
                   help="weights and activations; int8: dynamic int8 quantisation of the Linear layers (CPU only)")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in --out (else a rerun resumes)")
    p.add_argument("--update", action="store_true",
                   help="the inputs may differ from those --out was tagged with: tag only new and changed images "
                        "into new parts, list removed ones in the manifest (other options must stay the same)")
    p.add_argument("--hash", dest="content_hash", action="store_true",
                   help="tell changed images by their content's SHA-256 (reads every image) instead of size and "
                        "modification time")
    p.add_argument("--log-every", type=positive_float, default=30.0, help="seconds between progress lines when not on a terminal")
    p.add_argument("-q", "--quiet", action="store_true", help="no note on stderr about the bundled demo model")
    p.add_argument("--verify", action="store_true",
                   help="with --onnx: check every file's SHA-256 against the export manifest first")
    p.add_argument("--shard-id", type=non_negative_int, metavar="I",
                   help="tag only shard I of --num-shards (a job array's index), into --out/shard-IIIII-of-NNNNN")
    p.add_argument("--num-shards", type=positive_int, metavar="N", help="the number of shards (see --shard-id)")
    p.add_argument("--merge", metavar="OUT",
                   help="check that OUT holds every shard once, complete, and write its manifest (no tagging)")
    add_vocab_arguments(p)
    add_confidence_arguments(p)
    add_adapter_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from nxtrec.cli.notices import check_input_paths, demo_notice, loading
    from nxtrec.cli.predict import check_onnx_dir
    from nxtrec.tagging.job import TagOptions, run_tag

    if args.merge:
        return merge(args)
    if not args.out:
        raise NxtrecError("--out is required (or --merge OUT)")
    skip = ("command", "func", "argv", "verify", "quiet", "merge")
    options = TagOptions(**{k: v for k, v in vars(args).items() if k not in skip})
    check_input_paths(options.inputs)
    if options.onnx:
        check_onnx_dir(options.onnx, args.verify)
    if options.processes > 1 and "WORLD_SIZE" not in os.environ:
        from nxtrec.tagging.launch import run_ranks

        options.validate()
        return run_ranks(args.argv, options.processes)
    if "WORLD_SIZE" in os.environ:  # a rank: end with `nxtrec tag --processes` when it is killed
        from nxtrec.tagging.launch import watch_launcher

        watch_launcher()
    if os.environ.get("RANK", "0") == "0":  # once, from the process that reports
        demo_notice(options.model, options.onnx, args.quiet)
    summary = run_tag(options, lambda: loading("tag", options.model, options.onnx, args.quiet))
    if summary.counts:  # rank 0
        print(f"nxtrec tag: {summary.line()}", file=sys.stderr)
        return 1 if summary.counts["failed"] or summary.counts.get("shard_errors") else 0
    return 0


def merge(args) -> int:
    from nxtrec.tagging.merge import TagMergeError, merge_shards

    if args.inputs or args.out:
        raise NxtrecError("--merge OUT takes no inputs and no --out")
    try:
        manifest = merge_shards(args.merge)
    except TagMergeError as e:
        for problem in e.problems:  # one line each
            print(f"nxtrec tag: error: {problem}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    print(f"nxtrec tag: {manifest['num_shards']} shards, {c['images']} images ({c['tagged']} tagged, "
          f"{c['failed']} failed) in {args.merge}", file=sys.stderr)
    return 0
