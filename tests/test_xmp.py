"""`nxtrec tag --format xmp`: sidecars that exiftool reads back and validates, people's
keywords kept through a run, a rerun and a kill -9 run, special characters intact, and
people's keywords read back as ground truth (`nxtrec import xmp`). Tiny random model, real
image files, real exiftool."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datagen
import pytest

from nxtrec.cli.main import main
from nxtrec.data.xmp import (
    NEW_SIDECAR,
    SidecarTags,
    merged_sidecar,
    people_keywords,
    xml_text,
)

EXIFTOOL = shutil.which("exiftool")
pytestmark = [pytest.mark.skipif(EXIFTOOL is None, reason="exiftool is not installed (Debian: libimage-exiftool-perl)"),
              pytest.mark.usefixtures("one_thread")]  # fmt: skip
VENV_BIN = Path(sys.executable).parent
PEOPLE = ["Holiday", 'Anna "A", Müller']


def _exif(*paths: Path) -> list[dict]:
    """exiftool's reading of the sidecars: keyword lists (a single value made a list)."""
    out = subprocess.run([EXIFTOOL, "-j", "-struct", "-XMP:all", *map(str, paths)], check=True, capture_output=True).stdout
    rows = json.loads(out)
    for row in rows:
        for key in ("Subject", "HierarchicalSubject", "TagsList"):
            value = row.get(key, [])
            row[key] = [str(v) for v in (value if isinstance(value, list) else [value])]
    return rows


def _validate(*paths: Path) -> None:
    proc = subprocess.run([EXIFTOOL, "-validate", "-warning", "-a", *map(str, paths)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0 and "Error" not in proc.stdout and "Warning" not in proc.stdout, proc.stdout
    assert proc.stdout.count("Validate                        : OK") == len(paths), proc.stdout


def _images(folder: Path, n: int = 5) -> list[Path]:
    paths = [datagen.write_image(folder / ("sub" if i == n - 1 else "") / f"img{i}.jpg", i) for i in range(n)]
    for path in paths[:2]:  # a person tagged two photos before nxtrec came (exiftool writes their sidecars)
        args = [f"-XMP-dc:Subject={k}" for k in PEOPLE] + ["-XMP-lr:HierarchicalSubject=People|Anna"]
        subprocess.run([EXIFTOOL, "-q", "-o", f"{path}.xmp", *args, str(path)], check=True)
    return paths


def _labels(out: Path) -> dict[str, list[str]]:
    records = [json.loads(line) for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()]
    return {r["id"]: list(dict.fromkeys(xml_text(lab["label"]) for lab in r["labels"])) for r in records}


def _check_sidecars(images: list[Path], labels: dict[str, list[str]]) -> None:
    sidecars = [Path(f"{p}.xmp") for p in images]
    _validate(*sidecars)
    for image, row in zip(images, _exif(*sidecars)):
        people = PEOPLE if image.name in ("img0.jpg", "img1.jpg") else []
        want = labels[str(image)]
        assert row["Subject"] == people + [k for k in want if k not in people]
        assert row["HierarchicalSubject"] == (["People|Anna"] if people else []) + [
            "nxtrec|" + k.replace("|", "\uff5c") for k in want]  # fmt: skip
        assert row["TagsList"] == ["nxtrec/" + k.replace("/", "\uff0f") for k in want]
        assert [lab["Label"] for lab in row["Labels"]] == want
        assert row["Parent"] == "nxtrec" and row["TaggerModel"]


def test_people_keywords_survive_a_run_and_a_rerun_and_image_files_are_untouched(tiny_model_dir, tmp_path):
    images = _images(tmp_path / "photos")
    before = {p: p.read_bytes() for p in images}
    args = [tmp_path / "photos", "--model", tiny_model_dir, "--format", "xmp", "--top-k", "3", "--workers", "1"]
    assert main(["tag", *map(str, args), "--out", str(tmp_path / "out1")]) == 0
    labels = _labels(tmp_path / "out1")
    _check_sidecars(images, labels)
    assert all(p.read_bytes() == data for p, data in before.items())
    # a person adds a keyword in their photo manager; nxtrec runs again (a new tag folder)
    subprocess.run([EXIFTOOL, "-q", "-overwrite_original", "-XMP-dc:Subject+=Beach", f"{images[2]}.xmp"], check=True)
    assert main(["tag", *map(str, args), "--out", str(tmp_path / "out2")]) == 0
    row = _exif(Path(f"{images[2]}.xmp"))[0]
    assert row["Subject"].count("Beach") == 1 and len(row["Subject"]) == len(set(row["Subject"]))
    assert people_keywords(Path(f"{images[2]}.xmp").read_bytes()) == ["Beach"]
    assert people_keywords(Path(f"{images[0]}.xmp").read_bytes()) == PEOPLE


def test_kill_9_then_rerun_leaves_whole_sidecars_without_duplicates(tiny_model_dir, tmp_path):
    images = _images(tmp_path / "photos", n=6)
    out = tmp_path / "out"
    cmd = [str(VENV_BIN / "nxtrec"), "tag", str(tmp_path / "photos"), "--out", str(out), "--model", str(tiny_model_dir),
           "--format", "xmp", "--top-k", "3", "--batch-size", "1", "--part-size", "1", "--workers", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not list(out.glob("part-*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    written = [Path(f"{p}.xmp") for p in images if Path(f"{p}.xmp").exists()]
    _validate(*written)  # killed at any moment: every sidecar whole, the old or the new one
    assert len(list(out.glob("part-*.jsonl"))) < len(images)  # killed midway
    assert subprocess.run(cmd, check=False, stderr=subprocess.DEVNULL, env=env).returncode == 0
    _check_sidecars(images, _labels(out))
    assert not list(tmp_path.rglob("*.tmp"))


def test_special_characters_come_out_intact_and_other_tools_data_is_kept(tmp_path):
    labels = ["AC/DC", "black|white", "salt, pepper", 'the "best" dog', "café crème", "日本の犬", "ctrl\x1cchar"]
    path = tmp_path / "scene.jpg.xmp"  # another tool's sidecar: a keyword, a title, a rating
    subprocess.run([EXIFTOOL, "-q", "-o", str(path), "-XMP-dc:Subject=mine", "-XMP-dc:Title=Sea", "-XMP-xmp:Rating=4",
                    str(Path(__file__).parents[1] / "examples" / "scene.jpg")], check=True)  # fmt: skip
    tags = SidecarTags([{"label": lab, "prob": 0.5} for lab in labels[:-1]] + [{"label": labels[-1], "prob": 0.5,
                        "confidence": 0.25}], "tiny", "2026-01-02T03:04:05+00:00")  # fmt: skip
    path.write_bytes(merged_sidecar(path.read_bytes(), tags))
    _validate(path)
    row = _exif(path)[0]
    assert row["Subject"] == ["mine", *(xml_text(lab) for lab in labels)] and row["Subject"][-1] == "ctrlchar"
    assert "nxtrec|black\uff5cwhite" in row["HierarchicalSubject"] and "nxtrec/AC\uff0fDC" in row["TagsList"]
    assert row["Title"] == "Sea" and row["Rating"] == 4
    assert [lab.get("Confidence") for lab in row["Labels"]] == [None] * (len(labels) - 1) + [0.25]
    again = merged_sidecar(path.read_bytes(), SidecarTags([{"label": "dog", "prob": 0.9}], "tiny", "2026-01-03"))
    assert people_keywords(again) == ["mine"] and b"AC/DC" not in again and b"Sea" in again
    # a new sidecar comes from a template: exiftool reads it as the document built for an empty one
    (tmp_path / "new.xmp").write_bytes(merged_sidecar(None, tags))
    (tmp_path / "built.xmp").write_bytes(merged_sidecar(NEW_SIDECAR.encode(), tags))
    _validate(tmp_path / "new.xmp")
    new, built = _exif(tmp_path / "new.xmp", tmp_path / "built.xmp")
    assert {**new, "SourceFile": ""} == {**built, "SourceFile": ""} and new["Subject"] == row["Subject"][1:]


def test_import_xmp_gives_people_keywords_as_ground_truth_and_shards_are_refused(tiny_model_dir, tmp_path, capsys):
    images = _images(tmp_path / "photos", n=3)
    args = [tmp_path / "photos", "--model", tiny_model_dir, "--format", "xmp", "--top-k", "3", "--workers", "1"]
    assert main(["tag", *map(str, args), "--out", str(tmp_path / "out")]) == 0
    assert main(["import", "xmp", str(tmp_path / "photos"), "--out", str(tmp_path / "gt.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gt.jsonl").read_text().splitlines()]
    assert rows == [{"image": str(p), "gt": PEOPLE} for p in images[:2]]
    from nxtrec.cli.score import load_prediction_records

    lines = next((tmp_path / "out").glob("part-*.jsonl")).read_text().splitlines()
    (tmp_path / "pred.jsonl").write_text("".join(line + "\n" for line in lines if "sub/" not in line))  # the two with gt
    records = load_prediction_records(str(tmp_path / "pred.jsonl"), str(tmp_path / "gt.jsonl"))
    assert [(r["image"], r["gt"]) for r in records] == [(str(p), PEOPLE) for p in images[:2]]
    datagen.write_img2dataset_shard(tmp_path / "shards" / "00000.tar", 0, 2)
    capsys.readouterr()
    code = main(["tag", "--shards", str(tmp_path / "shards" / "00000.tar"), "--out", str(tmp_path / "o2"),
                 "--model", str(tiny_model_dir), "--format", "xmp"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "sample of a shard" in err and len(err.splitlines()) == 1
    datagen.write_image(tmp_path / "two" / "a.jpg", 1)
    datagen.write_image(tmp_path / "two" / "a.png", 2, fmt="PNG")
    code = main(["tag", str(tmp_path / "two"), "--out", str(tmp_path / "o3"), "--model", str(tiny_model_dir),
                 "--format", "xmp", "--xmp-name", "stem"])  # fmt: skip
    assert code == 2 and "would share the sidecar" in capsys.readouterr().err
