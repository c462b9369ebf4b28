"""`nxtrec download NAME --out DIR`: a released model, fetched and converted in one command."""

from __future__ import annotations

from nxtrec.model.download import RELEASES


def register(sub) -> None:
    p = sub.add_parser("download", help="fetch a released model (checkpoint, CLIP, tokenizer) and convert it",
                       description="Fetch a released nxtp model's checkpoint (Hugging Face), OpenAI's CLIP ViT-L/14 "
                                   "(SHA-256 checked) and the gated LLaMA-2 tokenizer, then convert them into a model "
                                   "directory. Interrupted downloads resume; cached files are reused.")
    p.add_argument("name", choices=sorted(RELEASES), help="released model")
    p.add_argument("--out", metavar="DIR", help="model directory to write (required unless --print-urls)")
    p.add_argument("--tokenizer", metavar="PATH", help="a local LLaMA-2 tokenizer.model (default: fetched from the gated "
                   "meta-llama/Llama-2-7b-hf repository, which needs a token)")
    p.add_argument("--hf-token", metavar="TOKEN", help="Hugging Face token of an account that accepted Meta's LLaMA-2 licence "
                   "(default: the HF_TOKEN environment variable, then huggingface_hub's saved login)")
    p.add_argument("--cache", metavar="DIR", help="keep downloads here (default: ~/.cache/nxtrec for CLIP, the Hugging Face cache "
                   "for the rest)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype of the model directory (default: %(default)s)")
    p.add_argument("--print-urls", action="store_true",
                   help="print what would be fetched, with checksums, and exit (for machines without access)")
    p.set_defaults(func=run_download)


def run_download(args) -> int:
    from nxtrec.errors import NxtrecError
    from nxtrec.model.download import download_model, planned_urls

    if args.print_urls:
        for url, what in planned_urls(args.name, args.tokenizer):
            print(f"{url}\t{what}")
        print("then: nxtrec convert nxtp --checkpoint FILE.pth --clip ViT-L-14.pt --tokenizer tokenizer.model --out DIR")
        return 0
    if not args.out:
        raise NxtrecError("--out DIR is required (or use --print-urls)")
    out = download_model(args.name, args.out, tokenizer=args.tokenizer, hf_token=args.hf_token, cache=args.cache,
                         dtype=args.dtype)
    print(f"wrote {out}")
    return 0
