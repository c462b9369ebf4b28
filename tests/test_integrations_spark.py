"""nxtrec.integrations.spark on a real local PySpark (local[2], loopback only, no UI): a
DataFrame of image bytes read from Parquet, tagged with mapInArrow and written as Parquet,
gives the records of `nxtrec tag`."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import scale_data

pytest.importorskip("pyspark", reason="PySpark is not installed (the [spark] extra)")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("no Java runtime for PySpark (make test installs default-jre-headless)", allow_module_level=True)

from pyspark.sql import SparkSession

from nxtrec.integrations.spark import output_schema, tag_dataframe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spark():
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"  # loopback only, also for the block manager
    paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)  # the workers import this checkout
    session = (
        SparkSession.builder.master("local[2]").appName("nxtrec-test")
        .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
        .config("spark.executorEnv.PYTHONPATH", os.environ["PYTHONPATH"])
        .getOrCreate()
    )  # fmt: skip
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_spark_bytes_give_the_records_of_nxtrec_tag(spark, tiny_model_dir, tmp_path):
    paths = scale_data.write_collection(tmp_path / "imgs")
    parquet = scale_data.write_parquet(paths, tmp_path / "images.parquet")
    records, errors = scale_data.tag_reference(tiny_model_dir, tmp_path / "imgs", tmp_path / "tagged")
    df = spark.read.parquet(str(parquet)).repartition(4)
    tagged = tag_dataframe(df, model=str(tiny_model_dir), image_column="jpg", id_column="key", top_k=4,
                           min_prob=0.001, batch_size=16)  # fmt: skip
    assert tagged.schema == output_schema(df.schema, "jpg")
    tagged.write.parquet(str(tmp_path / "out"))
    rows = pq.read_table(str(tmp_path / "out")).to_pylist()  # read back by pyarrow, not by Spark
    assert "jpg" not in rows[0] and rows[0]["path"] == rows[0]["key"]
    scale_data.assert_rows_match(rows, records, errors, "key")
