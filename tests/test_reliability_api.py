"""The Python API refuses bad arguments with a ValueError and bad images with an ImageError,
one result per input otherwise; predict's text output keeps every label on its line (issue #33)."""

import json
import re

import pytest
from PIL import Image

from nxtrec.cli.predict import print_result
from nxtrec.errors import NxtrecError
from nxtrec.inference.recognizer import Recognizer
from nxtrec.model.image import ImageError, load_image, preprocess_array


@pytest.fixture(scope="module")
def recognizer(tiny_model_dir):
    return Recognizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("size", [(0, 0), (1, 0), (0, 7)])
def test_an_empty_pil_image_is_an_image_error(recognizer, size):
    empty = Image.new("RGB", size)
    with pytest.raises(ImageError, match=rf"image has zero size \({size[0]}x{size[1]}\)"):
        recognizer.predict([Image.new("RGB", (32, 32)), empty])
    with pytest.raises(ImageError):
        load_image(empty)
    with pytest.raises(ImageError):
        preprocess_array(empty, 32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), "top_k must be an integer >= 1 (got 0)"),
    (dict(top_k=-1), "top_k must be an integer >= 1 (got -1)"),
    (dict(top_k=2.5), "top_k must be an integer >= 1"),
    (dict(extra_k=-1), "extra_k must be an integer >= 0"),
    (dict(batch_size=0), "batch_size must be an integer >= 1 (got 0)"),
    (dict(batch_size=-2), "batch_size must be an integer >= 1"),
])  # fmt: skip
def test_bad_arguments_are_value_errors(recognizer, kwargs, message):
    images = [Image.new("RGB", (32, 32)), Image.new("RGB", (40, 30))]
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        recognizer.predict(images, **kwargs)
    assert isinstance(e.value, NxtrecError)  # the command line still prints one line, exit 2


def test_one_result_per_image(recognizer):
    images = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(3)]
    assert len(recognizer.predict(images, top_k=1, batch_size=2)) == 3
    assert recognizer.predict([], top_k=1) == []


def test_text_output_escapes_control_characters(capsys):
    labels = [{"label": "hot\ndog", "prob": 0.5}, {"label": "red\x1b[31m\tcar\u2028", "prob": 0.25},
              {"label": "café", "prob": 0.125}]
    print_result("dir/photo\n.jpg", labels, as_json=False)
    out = capsys.readouterr().out
    assert out.splitlines() == ["dir/photo\\n.jpg", "  0.50000  hot\\ndog", "  0.25000  red\\x1b[31m\\tcar\\u2028",
                                "  0.12500  café"]
    print_result("p.jpg", labels, as_json=True)
    assert json.loads(capsys.readouterr().out)["labels"] == labels  # JSON unchanged
