"""`nxtrec convert`: a model directory from released nxtp or LLaMA-2 + CLIP weights."""

from __future__ import annotations

from nxtrec.cli.options import (
    existing_dir,
    existing_file,
    non_negative_int,
    positive_int,
)


def register(sub) -> None:
    p = sub.add_parser("convert", help="build a model directory from released nxtp or LLaMA-2 + CLIP weights")
    kinds = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    n = kinds.add_parser("nxtp", help="released nxtp checkpoint + OpenAI CLIP ViT-L/14 + LLaMA-2 tokenizer")
    n.add_argument("--checkpoint", required=True, type=existing_file, help="e.g. ckpt_epoch_03_iter_0021360.pth")
    n.add_argument("--clip", required=True, type=existing_file, help="OpenAI CLIP ViT-L-14.pt (TorchScript archive)")
    n.add_argument("--tokenizer", required=True, type=existing_file, help="LLaMA-2 tokenizer.model")
    n.add_argument("--out", required=True, help="output model directory")
    n.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the saved weights")
    n.add_argument("--decoder-heads", type=positive_int, help="decoder attention heads (default: dim / 128, as LLaMA-2)")
    n.add_argument("--encoder-heads", type=positive_int, help="encoder attention heads (default: width / 64, as CLIP)")
    n.set_defaults(func=run_convert_nxtp)
    m = kinds.add_parser("llama", help="LLaMA-2 (Meta or Hugging Face format) + CLIP, to start training")
    m.add_argument("--llama", required=True, type=existing_dir, help="Meta folder (consolidated.00.pth, params.json) or Hugging Face folder")
    m.add_argument("--clip", required=True, type=existing_file, help="OpenAI CLIP ViT-L-14.pt")
    m.add_argument("--decoder-layers", type=positive_int, default=6, help="keep the first L decoder blocks (6: 1.78B, 1: 0.77B)")
    m.add_argument("--tokenizer", help="tokenizer.model (default: the one in --llama)")
    m.add_argument("--out", required=True, help="output model directory")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the saved weights")
    m.add_argument("--seed", type=non_negative_int, default=0, help="seed for the added special-token rows and the new projection")
    m.add_argument("--encoder-heads", type=positive_int, help="encoder attention heads (default: width / 64, as CLIP)")
    m.set_defaults(func=run_convert_llama)


def run_convert_nxtp(args) -> int:
    from nxtrec.model.convert import convert_nxtp

    out = convert_nxtp(args.checkpoint, args.clip, args.tokenizer, args.out, dtype=args.dtype,
                       decoder_heads=args.decoder_heads, encoder_heads=args.encoder_heads)
    print(f"wrote {out}")
    return 0


def run_convert_llama(args) -> int:
    from nxtrec.model.convert import convert_llama

    out = convert_llama(args.llama, args.clip, args.out, args.decoder_layers, tokenizer=args.tokenizer, dtype=args.dtype,
                        seed=args.seed, encoder_heads=args.encoder_heads)
    print(f"wrote {out}")
    return 0
