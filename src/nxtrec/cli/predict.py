"""`nxtrec predict IMG... [--model DIR | --onnx DIR]`: ranked labels per image."""

from __future__ import annotations

import json
import os
import sys

from nxtrec.cli.adapter_options import add_adapter_argument
from nxtrec.cli.confidence_options import add_confidence_arguments, check_engine_confidence, confidence_kwargs
from nxtrec.cli.notices import DEMO_NOTICE, demo_notice, loading  # noqa: F401 (DEMO_NOTICE: imported from here too)
from nxtrec.cli.options import (
    device,
    existing_dir,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from nxtrec.cli.vocab_options import add_vocab_arguments, vocab_kwargs
from nxtrec.model.image import EXIF_ENV, MAX_IMAGE_PIXELS, MAX_PIXELS_ENV


def register(sub) -> None:
    p = sub.add_parser("predict", help="recognize the objects in images")
    p.add_argument("images", nargs="+", help="image files or folders (all images inside)")
    p.add_argument("--model", help="model directory (default: the bundled default model)")
    p.add_argument("--onnx", metavar="DIR", type=existing_dir, help="run an exported ONNX directory with ONNX Runtime instead of PyTorch")
    p.add_argument("--top-k", type=positive_int, default=20, help="number of labels (one-shot branches)")
    p.add_argument("--extra-k", type=non_negative_int, default=0, help="extra one-shot branches sampled beyond --top-k")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"],
                   help="int8: dynamic int8 quantisation of the Linear layers (CPU only)")
    p.add_argument("--sampler", default="one-shot", choices=["one-shot", "greedy", "beam"],
                   help="one-shot: k branches from the top-k first tokens (the paper's); greedy; beam search")
    p.add_argument("--ranking", default="prob", choices=["prob", "ppl", "sim", "none"],
                   help="order of the labels: probability, perplexity, image similarity, generation order")
    p.add_argument("--beam-size", type=positive_int, default=3, help="beam sampler: beams kept per step")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="greedy sampler: softmax temperature")
    p.add_argument("--top-k-tokens", type=positive_int, default=1, help="greedy sampler: sample among this many tokens (1 = argmax)")
    p.add_argument("--top-p", type=probability, default=None, help="greedy sampler: nucleus sampling threshold")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0,
                   help="greedy sampler: divide the logits of tokens already written by this (1 = off)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no note on stderr about the bundled demo model, no loading line")
    p.add_argument("--maps", metavar="OUT_DIR", help="also write where each label was grounded: OUT_DIR/IMAGE/"
                   "NN_LABEL.png overlays, sheet.png (all side by side) and maps.json grids (one-shot sampler, PyTorch path)")
    p.add_argument("--verify", action="store_true",
                   help="with --onnx: check every file's SHA-256 against the export manifest first")
    p.add_argument("--no-exif-orientation", action="store_true",
                   help="ignore EXIF orientation tags, as the reference did (same as NXTREC_EXIF_ORIENTATION=0)")
    p.add_argument("--max-pixels", type=positive_int,
                   help=f"refuse images with more pixels (default {MAX_IMAGE_PIXELS}; NXTREC_MAX_IMAGE_PIXELS)")
    add_vocab_arguments(p)
    add_confidence_arguments(p)
    add_adapter_argument(p)
    p.set_defaults(func=run)


def print_result(path: str, labels: list[dict], as_json: bool) -> None:
    """One image's labels: a JSON line, or the path then one `  PROB  LABEL` line per label,
    where control characters (a newline in a label, ...) are escaped as `\\n`, `\\x1b`, ...
    so that every label stays on its line (JSON keeps the strings as they are)."""
    if as_json:
        print(json.dumps({"image": path, "labels": labels}, ensure_ascii=False))
    else:
        print(_one_line(path))
        for item in labels:
            conf = f"  (confidence {item['confidence']:.3f})" if "confidence" in item else ""
            print(f"  {item['prob']:.5f}  {_one_line(item['label'])}{conf}")
    sys.stdout.flush()


def _one_line(text: str) -> str:
    """`text` with its control characters (C0, DEL, C1, line and paragraph separators)
    escaped as Python writes them; other characters, backslashes included (Windows paths),
    stay as they are."""
    import unicodedata

    if text.isprintable():
        return text
    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text)


def decode_options(args):
    """The decoding options of the parsed command line."""
    from nxtrec.inference.engine import DecodeOptions

    options = DecodeOptions(top_k=args.top_k, extra_k=args.extra_k, sampler=args.sampler, ranking=args.ranking,
                            maps=bool(args.maps), **vocab_kwargs(args), **confidence_kwargs(args))  # fmt: skip
    if args.sampler == "beam":
        return DecodeOptions.of(options, beam_size=args.beam_size)
    if args.sampler == "greedy":
        return DecodeOptions.of(options, temperature=args.temperature, top_k_tokens=args.top_k_tokens,
                                top_p=args.top_p, repetition_penalty=args.repetition_penalty)  # fmt: skip
    return options


def run(args) -> int:
    from nxtrec.engines import capabilities_of, load_engine
    from nxtrec.inference.engine import check_top_k, predict_files
    from nxtrec.model.image import list_images

    # Through the environment, the image switches reach every reader (the ONNX path too).
    if args.no_exif_orientation:
        os.environ[EXIF_ENV] = "0"
    if args.max_pixels:
        os.environ[MAX_PIXELS_ENV] = str(args.max_pixels)
    paths = list_images(args.images, strict=True)  # a mistyped folder: exit code 2
    if not paths:
        print("nxtrec predict: no images found", file=sys.stderr)
        return 1
    options = decode_options(args)
    options.check(capabilities_of(onnx=bool(args.onnx)))
    if args.onnx:
        check_onnx_dir(args.onnx, args.verify)
    quiet = args.quiet or args.json
    with loading("predict", args.model, args.onnx, quiet=quiet):
        engine = load_engine(args.model, args.onnx, device=args.device, dtype=args.dtype, calibration=args.calibration,
                             adapter=args.adapter)
    check_top_k(options, engine.vocab_size)
    check_engine_confidence(engine, options)
    demo_notice(args.model, args.onnx, quiet=quiet)
    failed = 0
    for path, labels, error in predict_files(engine, paths, options, args.batch_size, each=_map_writer(args)):
        if error is not None:
            failed += 1
            print(f"nxtrec predict: skipped {error}", file=sys.stderr)
        else:
            print_result(path, [{k: v for k, v in lab.to_dict().items() if k != "map"} for lab in labels], args.json)
    if failed:
        print(f"nxtrec predict: {failed} of {len(paths)} images failed", file=sys.stderr)
    return 1 if failed else 0


def check_onnx_dir(onnx_dir: str, verify: bool) -> None:
    """With `verify`, every file's SHA-256 against the export manifest (sizes are checked
    whenever the folder opens)."""
    from nxtrec.errors import NxtrecError
    from nxtrec.onnx.format import detect_layout
    from nxtrec.onnx.integrity import check_hashes, read_manifest

    if not verify:
        return
    if detect_layout(onnx_dir) != "nxtrec":
        raise NxtrecError(f"{onnx_dir}: --verify needs an `nxtrec export-onnx` folder (the released files record no hashes)")
    check_hashes(onnx_dir, read_manifest(onnx_dir))


def map_folder(out_dir: str, path: str, used: set[str]) -> str:
    """OUT_DIR/<image file stem>, with -2, -3, ... when two images share a stem."""
    from pathlib import Path

    stem, name, n = Path(path).stem, Path(path).stem, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return str(Path(out_dir) / name)


def _map_writer(args):
    """With --maps, what writes each image's label maps as it is predicted."""
    if not args.maps:
        return None
    from nxtrec.inference.heatmaps import save_label_maps

    folders: set[str] = set()
    return lambda path, image, labels: save_label_maps(map_folder(args.maps, path, folders), path, image, labels)
