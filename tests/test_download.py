"""`nxtrec download` against a stand-in of Hugging Face and OpenAI's CDN on 127.0.0.1: a
threaded HTTP server with Range support serving tiny files in the released layout (a
`.pth` nxtp checkpoint, CLIP's TorchScript archive under /<sha256>/, a gated tokenizer).
No traffic leaves the loopback interface."""

import hashlib
import http.server
import io
import subprocess
import sys
import threading
from urllib.parse import urlparse

import pytest
import torch
from test_convert import nxtp_trained_subset, write_clip_archive

from nxtrec.cli.main import main
from nxtrec.model.config import DecoderConfig, EncoderConfig, ModelConfig, llama_hidden_dim
from nxtrec.model.directory import build_model, load_model_dir
from nxtrec.model.download import fetch_verified

TOKEN = "hf_standin_token"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StandIn(http.server.ThreadingHTTPServer):
    """Serves `files` (path -> bytes); paths in `gated` need the bearer TOKEN; each path in
    `cut_once` has its connection dropped halfway through the body the first time."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.gated: set[str] = set()
        self.cut_once: set[str] = set()
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def log_message(self, *args):
        pass

    def _serve(self, body: bool):
        server: StandIn = self.server
        path = urlparse(self.path).path
        server.log.append((self.command, path, self.headers.get("Range")))
        if path not in server.files:
            return self._status(404, {"X-Error-Code": "EntryNotFound"})
        if path in server.gated and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._status(401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted."})
        data = server.files[path]
        start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if path in server.cut_once:
            server.cut_once.discard(path)
            self.wfile.write(data[start:len(data) // 2])
            self.close_connection = True  # the client sees the body end early
            return
        self.wfile.write(data[start:])

    def _status(self, code: int, headers: dict):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def standin():
    server = StandIn()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def released_source(tokenizer):
    """A small model with the released head widths (128 decoder, 64 encoder), so that the
    conversion's defaults apply; its frozen encoder parts are fp16-representable, as CLIP's."""
    config = ModelConfig(
        encoder=EncoderConfig(width=128, layers=2, heads=2, patch_size=16, image_size=64),
        decoder=DecoderConfig(dim=256, n_layers=2, n_heads=2, hidden_dim=llama_hidden_dim(256, multiple_of=32),
                              vocab_size=tokenizer.vocab_size),
    )
    torch.manual_seed(5)
    model = build_model(config).eval()
    trained = {k.removeprefix("module.") for k in nxtp_trained_subset(model)}
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k not in trained:
                v.copy_(v.half().float())
    return model


def serve_release(server: StandIn, model, tokenizer_file, tmp_path) -> str:
    """The three artifacts at their released paths; returns the CLIP URL (sha256 in it)."""
    buf = io.BytesIO()
    # Optimizer state makes the file larger than huggingface_hub's 10 MB write chunk, so that
    # a dropped connection leaves something on disk to resume from (as with the real 7 GB).
    optimizer = {"state": {0: {"exp_avg": torch.zeros(6_000_000)}}}
    torch.save({"epoch": 3, "global_step": 21360, "model": nxtp_trained_subset(model), "optimizer": optimizer}, buf)
    server.files["/kaiyuyue/nxtp/resolve/main/ckpt_epoch_03_iter_0021360.pth"] = buf.getvalue()
    write_clip_archive(model, tmp_path / "ViT-L-14.pt")
    clip = (tmp_path / "ViT-L-14.pt").read_bytes()
    clip_path = f"/clip/models/{hashlib.sha256(clip).hexdigest()}/ViT-L-14.pt"
    server.files[clip_path] = clip
    server.files["/meta-llama/Llama-2-7b-hf/resolve/main/tokenizer.model"] = tokenizer_file.read_bytes()
    server.gated.add("/meta-llama/Llama-2-7b-hf/resolve/main/tokenizer.model")
    return server.url + clip_path


@pytest.fixture
def loopback_env(monkeypatch, standin, tmp_path):
    """Every request goes to the stand-in, in this process (whose huggingface_hub may have
    read its settings at import: nxtrec passes the endpoint on each call) and in children."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_ENDPOINT", standin.url)
    # no user-agent lookup at {ENDPOINT}/api/agent-harnesses: only the released files are asked for
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return standin


@pytest.mark.slow  # a real CLI process, about 20-30 s on a loaded machine
def test_download_resumes_dropped_connections_and_converts(loopback_env, tokenizer, tokenizer_file, tmp_path, monkeypatch):
    server = loopback_env
    source = released_source(tokenizer)
    clip_url = serve_release(server, source, tokenizer_file, tmp_path)
    monkeypatch.setenv("NXTREC_CLIP_URL", clip_url)
    ckpt_path = "/kaiyuyue/nxtp/resolve/main/ckpt_epoch_03_iter_0021360.pth"
    clip_path = urlparse(clip_url).path
    server.cut_once.update({ckpt_path, clip_path})
    cache, out = tmp_path / "cache", tmp_path / "model"
    # a real process: the CLI as users run it, with huggingface_hub's own HTTP client
    cmd = [sys.executable, "-m", "nxtrec.cli.main", "download", "nxtp-1.78b-g3m", "--out", str(out), "--cache", str(cache),
           "--hf-token", TOKEN]  # fmt: skip
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # each cut file was fetched again from where the connection dropped, not from the start
    for path in (ckpt_path, clip_path):
        gets = [r for m, p, r in server.log if m == "GET" and p == path]
        assert len(gets) == 2 and gets[0] is None
        assert 0 < int(gets[1].removeprefix("bytes=").rstrip("-")) <= len(server.files[path]) // 2
    assert {p for _, p, _ in server.log} == set(server.files)  # nothing else was asked for
    model, _ = load_model_dir(out)
    expected = source.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    # a second run reuses every cached file: none is fetched again
    n_gets = sum(m == "GET" and p in server.files for m, p, _ in server.log)
    assert main(["download", "nxtp-1.78b-g3m", "--out", str(tmp_path / "again"), "--cache", str(cache), "--hf-token", TOKEN]) == 0
    assert sum(m == "GET" and p in server.files for m, p, _ in server.log) == n_gets


def test_a_part_file_from_an_earlier_run_is_resumed(standin, tmp_path):
    data = bytes(range(256)) * 400
    sha = hashlib.sha256(data).hexdigest()
    standin.files[f"/clip/models/{sha}/ViT-L-14.pt"] = data
    dest = tmp_path / "ViT-L-14.pt"
    (tmp_path / "ViT-L-14.pt.part").write_bytes(data[:30000])
    assert fetch_verified(f"{standin.url}/clip/models/{sha}/ViT-L-14.pt", dest, sha).read_bytes() == data
    assert standin.log == [("GET", f"/clip/models/{sha}/ViT-L-14.pt", "bytes=30000-")]
    assert not (tmp_path / "ViT-L-14.pt.part").exists()


def test_a_checksum_mismatch_is_refused_in_one_line(loopback_env, tmp_path, monkeypatch, capsys):
    sha = hashlib.sha256(b"the published file").hexdigest()
    loopback_env.files[f"/clip/models/{sha}/ViT-L-14.pt"] = b"a tampered file"
    monkeypatch.setenv("NXTREC_CLIP_URL", f"{loopback_env.url}/clip/models/{sha}/ViT-L-14.pt")
    (tmp_path / "tokenizer.model").write_bytes(b"unused: the CLIP file fails first")
    code = main(["download", "nxtp-1.78b-g70m", "--out", str(tmp_path / "model"), "--cache", str(tmp_path / "cache"),
                 "--tokenizer", str(tmp_path / "tokenizer.model")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "SHA-256 mismatch" in err and sha[:12] in err
    assert not list((tmp_path / "cache").rglob("ViT-L-14.pt*"))  # neither kept nor left as .part
    assert not (tmp_path / "model").exists()
    assert not any(path.endswith(".pth") for _, path, _ in loopback_env.log)  # the checkpoint was never requested


def test_the_gated_tokenizer_without_a_token_says_what_to_do(loopback_env, tokenizer_file, tmp_path, capsys):
    loopback_env.files["/meta-llama/Llama-2-7b-hf/resolve/main/tokenizer.model"] = tokenizer_file.read_bytes()
    loopback_env.gated.add("/meta-llama/Llama-2-7b-hf/resolve/main/tokenizer.model")
    code = main(["download", "nxtp-1.78b-g3m", "--out", str(tmp_path / "model"), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "meta-llama/Llama-2-7b-hf is gated" in err and "--hf-token" in err and "--tokenizer PATH" in err
    assert loopback_env.log == [("HEAD", "/meta-llama/Llama-2-7b-hf/resolve/main/tokenizer.model", None)]


def test_print_urls_names_every_file_and_its_checksum(monkeypatch, capsys):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("NXTREC_CLIP_URL", raising=False)
    assert main(["download", "nxtp-1.78b-g70m", "--print-urls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("https://huggingface.co/kaiyuyue/nxtp/resolve/main/ckpt_epoch_03_iter_1656549.pth\t")
    assert "md5 starts with e177c7" in lines[0]
    sha = "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"
    assert lines[1].startswith(f"https://openaipublic.azureedge.net/clip/models/{sha}/ViT-L-14.pt\t") and f"sha256 {sha}" in lines[1]
    assert lines[2].startswith("https://huggingface.co/meta-llama/Llama-2-7b-hf/resolve/main/tokenizer.model\t")
    assert main(["download", "nxtp-1.78b-g70m", "--print-urls", "--tokenizer", "tok.model"]) == 0
    assert "Llama-2-7b-hf" not in capsys.readouterr().out  # a local tokenizer is not fetched
