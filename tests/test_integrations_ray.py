"""nxtrec.integrations.ray on a real local Ray (2 CPUs, no dashboard, no usage stats): Parquet
of image bytes and a dataset of paths give the records of `nxtrec tag`; an actor killed in
the middle of the job is restarted by Ray and its batch redone, no row lost or doubled."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import scale_data

ray = pytest.importorskip("ray", reason="Ray is not installed (the [ray] extra)")

from nxtrec.integrations.ray import RayTagger, tag_dataset

ROOT = Path(__file__).resolve().parents[1]
# two actors take one of the two CPUs: the read and write tasks need the other
ACTOR_CPUS = 0.5


@pytest.fixture(scope="module")
def local_ray():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # the workers import nxtrec from this checkout, and this module (KillingTagger)
    paths = [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("scale")
    paths = scale_data.write_collection(root / "imgs")
    parquet = scale_data.write_parquet(paths, root / "images.parquet")
    records, errors = scale_data.tag_reference(tiny_model_dir, root / "imgs", root / "tagged")
    return parquet, records, errors


def _tag(parquet: Path, out: Path, model_dir: Path, tagger=RayTagger, **kwargs) -> list[dict]:
    ds = ray.data.read_parquet(str(parquet), override_num_blocks=8)  # tasks for both actors
    if tagger is RayTagger:
        ds = tag_dataset(ds, concurrency=2, num_cpus=ACTOR_CPUS, batch_size=16, model=str(model_dir), image_column="jpg",
                         id_column="key", top_k=4, min_prob=0.001)  # fmt: skip
    else:  # the same call, with a class that kills its actor once
        ds = ds.map_batches(tagger, fn_constructor_kwargs={"model": str(model_dir), "image_column": "jpg",
                            "id_column": "key", "top_k": 4, "min_prob": 0.001, "batch_size": 16, **kwargs},
                            batch_size=16, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=2),
                            num_cpus=ACTOR_CPUS)  # fmt: skip
    ds.write_parquet(str(out))
    return pq.read_table(str(out)).to_pylist()  # read back by pyarrow, not by Ray


def test_ray_bytes_give_the_records_of_nxtrec_tag(local_ray, collection, tiny_model_dir, tmp_path):
    parquet, records, errors = collection
    rows = _tag(parquet, tmp_path / "out", tiny_model_dir)
    assert "jpg" not in rows[0] and rows[0]["path"] == rows[0]["key"]  # bytes dropped, other columns kept
    scale_data.assert_rows_match(rows, records, errors, "key")


def test_ray_paths_column(local_ray, collection, tiny_model_dir, tmp_path):
    _, records, errors = collection
    ds = ray.data.from_items([{"path": name} for name in [*records, *errors]])
    ds = tag_dataset(ds, concurrency=2, num_cpus=ACTOR_CPUS, model=str(tiny_model_dir), image_column="path", top_k=4, min_prob=0.001)
    ds.write_parquet(str(tmp_path / "out"))
    rows = pq.read_table(str(tmp_path / "out")).to_pylist()
    assert all(r["error"].startswith(r["path"]) for r in rows if r["error"])  # a path names its image
    scale_data.assert_rows_match(rows, records, errors, "path")


class KillingTagger(RayTagger):
    """Kills its own actor process (SIGKILL) once, when a batch holds the given key."""

    def __init__(self, marker: str, key: str, **kwargs):
        super().__init__(**kwargs)
        self.marker, self.key = Path(marker), key

    def __call__(self, batch):
        if self.key in batch.column("key").to_pylist() and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def test_a_killed_actor_loses_and_doubles_nothing(local_ray, collection, tiny_model_dir, tmp_path):
    parquet, records, errors = collection
    marker = tmp_path / "killed"
    key = sorted(records)[120]
    rows = _tag(parquet, tmp_path / "out", tiny_model_dir, KillingTagger, marker=str(marker), key=key)
    assert marker.exists()  # an actor was killed mid-job, and Ray ran its batch again
    scale_data.assert_rows_match(rows, records, errors, "key")
