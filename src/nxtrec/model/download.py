"""`nxtrec download`: fetch a released model's three artifacts and convert them into a model
directory (docs/design.md#formats-that-load). Nothing in nxtrec downloads anything except this.

- the released nxtp checkpoint, from its Hugging Face repository (huggingface_hub: cached
  in the Hugging Face cache, resumable, HF_ENDPOINT honoured);
- OpenAI's CLIP ViT-L/14 file, from its published URL; the URL's last folder is the file's
  SHA-256 (the convention of OpenAI's `clip` package), which is checked before the file is
  used. Cached under `--cache`, resumed from a `.part` file after an interruption;
- the LLaMA-2 tokenizer: gated on Hugging Face (a token of an account that accepted Meta's
  licence), or a local `tokenizer.model`.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nxtrec.digests import file_sha256
from nxtrec.errors import NxtrecError
from nxtrec.extras import install_hint

CLIP_URL = (
    "https://openaipublic.azureedge.net/clip/models/"
    "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt"
)
CLIP_URL_ENV = "NXTREC_CLIP_URL"  # a mirror in the same layout: .../<sha256>/ViT-L-14.pt
TOKENIZER_REPO, TOKENIZER_FILE = "meta-llama/Llama-2-7b-hf", "tokenizer.model"
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
RETRIES = 5  # resumptions within one run after a dropped connection


@dataclass(frozen=True)
class Release:
    repo_id: str
    filename: str
    md5_prefix: str  # as published in the reference README's model table


RELEASES = {
    "nxtp-1.78b-g3m": Release("kaiyuyue/nxtp", "ckpt_epoch_03_iter_0021360.pth", "b2a69b"),
    "nxtp-1.78b-g70m": Release("kaiyuyue/nxtp", "ckpt_epoch_03_iter_1656549.pth", "e177c7"),
}


class DownloadError(NxtrecError):
    """A download failed or a file did not match its published checksum."""


def release(name: str) -> Release:
    if name not in RELEASES:
        raise NxtrecError(f"unknown model {name!r}; choose one of {', '.join(RELEASES)}")
    return RELEASES[name]


def clip_url() -> str:
    return os.environ.get(CLIP_URL_ENV) or CLIP_URL


def sha256_in_url(url: str) -> str:
    """The SHA-256 that OpenAI's URL layout carries in its last folder."""
    parts = url.rstrip("/").split("/")
    if len(parts) < 2 or not re.fullmatch(r"[0-9a-f]{64}", parts[-2]):
        raise NxtrecError(f"{url}: expected a URL ending in /<sha256>/<file> (set {CLIP_URL_ENV} to such a mirror)")
    return parts[-2]


def hf_endpoint() -> str:
    """Hugging Face's address, or the mirror HF_ENDPOINT names (read at call time, not at
    huggingface_hub's import)."""
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")


def hf_url(repo_id: str, filename: str) -> str:
    return f"{hf_endpoint()}/{repo_id}/resolve/main/{filename}"


def planned_urls(name: str, tokenizer: str | Path | None = None) -> list[tuple[str, str]]:
    """(URL, what it is) for everything `download_model` would fetch."""
    rel = release(name)
    url = clip_url()
    plan = [
        (hf_url(rel.repo_id, rel.filename), f"{name} checkpoint (md5 starts with {rel.md5_prefix})"),
        (url, f"OpenAI CLIP ViT-L/14 (sha256 {sha256_in_url(url)})"),
    ]
    if tokenizer is None:
        plan.append((hf_url(TOKENIZER_REPO, TOKENIZER_FILE),
                     "LLaMA-2 tokenizer (gated: needs a Hugging Face token of an account that accepted Meta's licence)"))
    return plan


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nxtrec"


def fetch_verified(url: str, dest: Path, sha256: str) -> Path:
    """`url` into `dest`, resumed from `dest.part` after an interruption, moved into place
    only once its SHA-256 matches; a file already at `dest` was verified when it got there."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for _ in range(RETRIES + 1):
        try:
            _fetch_into(url, part)
            break
        except (http.client.IncompleteRead, ConnectionError, TimeoutError) as e:
            last_error = e
        except urllib.error.URLError as e:
            raise DownloadError(f"{url}: {getattr(e, 'reason', e)}; use --print-urls to fetch it elsewhere") from None
    else:
        raise DownloadError(f"{url}: connection dropped {RETRIES + 1} times ({type(last_error).__name__}); "
                            "run the command again to resume")
    actual = file_sha256(part)
    if actual != sha256:
        part.unlink()
        raise DownloadError(f"{url}: SHA-256 mismatch (got {actual[:12]}..., published {sha256[:12]}...); "
                            "the partial file was deleted, run again or check the mirror")
    os.replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path) -> None:
    """One HTTP attempt, appending to `part` when the server honours a Range request."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: the part file is complete
            return
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    from tqdm import tqdm

    expected = int(response.headers.get("Content-Length") or -1)
    received = 0
    resumed = response.status == 206
    start = have if resumed else 0
    bar = tqdm(total=start + expected if expected >= 0 else None, initial=start, unit="B", unit_scale=True,
               desc=part.name.removesuffix(".part"), disable=None)  # None: no bar when stderr is no terminal
    with response, bar, open(part, "ab" if resumed else "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if 0 <= received < expected:  # http.client returns a short body without complaint
        raise http.client.IncompleteRead(b"", expected - received)


def hf_fetch(repo_id: str, filename: str, token: str | None, cache: Path | None) -> Path:
    """A file of a Hugging Face repository through the Hugging Face cache."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
    except ImportError:
        raise NxtrecError(f"nxtrec download needs huggingface_hub: {install_hint('huggingface_hub', 'download')}") from None
    try:
        return Path(hf_hub_download(repo_id, filename, token=token, cache_dir=cache, endpoint=hf_endpoint()))
    except GatedRepoError:
        raise DownloadError(
            f"{repo_id} is gated: accept its licence on huggingface.co and pass --hf-token (or set HF_TOKEN), "
            "or give a local file with --tokenizer PATH"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise DownloadError(f"{hf_url(repo_id, filename)}: {str(e).splitlines()[0]}; use --print-urls to fetch it elsewhere") from None


def download_model(name: str, out: str | Path, tokenizer: str | Path | None = None, hf_token: str | None = None,
                   cache: str | Path | None = None, dtype: str = "float32") -> Path:
    """Fetch (or reuse from the caches) the three artifacts of `name` and convert them into
    the model directory `out`. With `cache`, everything is kept there; by default the CLIP
    file goes to ~/.cache/nxtrec and the Hugging Face files to the Hugging Face cache."""
    from nxtrec.model.convert import convert_nxtp

    rel = release(name)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise NxtrecError(f"--tokenizer {tokenizer}: file not found (LLaMA-2's tokenizer.model is expected)")
    hf_cache = Path(cache) / "huggingface" if cache else None
    token = hf_token or os.environ.get("HF_TOKEN")
    url = clip_url()
    sha = sha256_in_url(url)
    # The gated tokenizer first: a missing token fails before gigabytes are fetched.
    tokenizer = tokenizer or hf_fetch(TOKENIZER_REPO, TOKENIZER_FILE, token, hf_cache)
    clip = fetch_verified(url, Path(cache or default_cache()) / "clip" / sha / url.rsplit("/", 1)[-1], sha)
    checkpoint = hf_fetch(rel.repo_id, rel.filename, token, hf_cache)
    return convert_nxtp(checkpoint, clip, tokenizer, out, dtype=dtype)
