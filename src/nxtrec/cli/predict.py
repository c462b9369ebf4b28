"""`nxtrec predict IMG... [--model DIR | --onnx DIR]`: ranked labels per image."""

from __future__ import annotations

import json
import sys

DEMO_NOTICE = (
    "note: using the bundled default model ({description}); "
    "pass --model DIR for real weights (see README: converting the released weights)"
)


def register(sub) -> None:
    p = sub.add_parser("predict", help="recognize the objects in images")
    p.add_argument("images", nargs="+", help="image files or folders (all images inside)")
    p.add_argument("--model", help="model directory (default: the bundled default model)")
    p.add_argument("--onnx", metavar="DIR", help="run an exported ONNX directory with ONNX Runtime instead of PyTorch")
    p.add_argument("--top-k", type=int, default=20, help="number of labels (one-shot branches)")
    p.add_argument("--extra-k", type=int, default=0, help="extra one-shot branches sampled beyond --top-k")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--sampler", default="one-shot", choices=["one-shot", "greedy", "beam"])
    p.add_argument("--ranking", default="prob", choices=["prob", "ppl", "sim", "none"])
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k-tokens", type=int, default=1, help="greedy sampler: sample among this many tokens (1 = argmax)")
    p.add_argument("--top-p", type=float, default=None, help="greedy sampler: nucleus sampling threshold")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.set_defaults(func=run)


def print_result(path: str, labels: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"image": path, "labels": labels}, ensure_ascii=False))
    else:
        print(path)
        for item in labels:
            print(f"  {item['prob']:.5f}  {item['label']}")
    sys.stdout.flush()


def run(args) -> int:
    from nxtrec.model.image import list_images

    paths = list_images(args.images)
    if not paths:
        print("nxtrec predict: no images found", file=sys.stderr)
        return 1
    if args.onnx:
        from nxtrec.errors import NxtrecError
        from nxtrec.onnx.runtime import predict_paths

        if args.sampler != "one-shot":
            raise NxtrecError("--onnx runs one-shot sampling only; drop --sampler")
        if args.model:
            raise NxtrecError("give either --model or --onnx, not both")
        results = predict_paths(args.onnx, paths, top_k=args.top_k, batch_size=args.batch_size,
                                extra_k=args.extra_k, ranking=args.ranking)
    else:
        results = _predict_torch(args, paths)
    failed = 0
    for path, labels, error in results:
        if error is not None:
            failed += 1
            print(f"nxtrec predict: skipped {error}", file=sys.stderr)
        else:
            print_result(path, labels, args.json)
    if failed:
        print(f"nxtrec predict: {failed} of {len(paths)} images failed", file=sys.stderr)
    return 1 if failed else 0


def _predict_torch(args, paths):
    """Yield (path, labels as dicts, error message or None), batch by batch."""
    from nxtrec.inference.recognizer import Recognizer
    from nxtrec.model.image import ImageError, load_image

    rec = Recognizer.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    if args.model is None:
        print(DEMO_NOTICE.format(description=rec.config.description or "demo"), file=sys.stderr)
    kwargs = {"sampler": args.sampler, "ranking": args.ranking}
    if args.sampler == "one-shot":
        kwargs["extra_k"] = args.extra_k
    elif args.sampler == "beam":
        kwargs["beam_size"] = args.beam_size
    else:
        kwargs.update(temperature=args.temperature, top_k_tokens=args.top_k_tokens, top_p=args.top_p,
                      repetition_penalty=args.repetition_penalty)
    for start in range(0, len(paths), args.batch_size):
        batch, good = paths[start : start + args.batch_size], []
        images = []
        for path in batch:
            try:
                images.append(load_image(path))
                good.append(path)
            except ImageError as e:
                yield path, None, str(e)
        if images:
            for path, labels in zip(good, rec.predict(images, top_k=args.top_k, batch_size=len(images), **kwargs)):
                yield path, [lab.to_dict() for lab in labels], None
