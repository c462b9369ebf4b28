"""The bundled default model keeps the R/P/F1 the README publishes, on the same held-out
synthetic scenes (regenerated here: the validation split depends only on its seed)."""

import pytest

from nxtrec.data.synth import generate
from nxtrec.evaluation.evaluate import evaluate
from nxtrec.model.directory import default_model_dir

# README, "The bundled demo model": nxtrec eval on the 1000 held-out scenes (seed 0).
PUBLISHED = {5: (0.74196, 0.50093, 0.58828), 10: (0.82279, 0.44649, 0.57085)}
TOLERANCE = 0.01


def test_bundled_model_scores_at_least_what_the_readme_publishes(tmp_path):
    generate(tmp_path / "synth", n=0, seed=0, n_val=1000, size=256, progress=False)
    summaries = evaluate(default_model_dir(), str(tmp_path / "synth" / "val"), [5, 10], batch_size=32,
                         num_workers=0, progress=False)
    for k, (r, p, f1) in PUBLISHED.items():
        s = summaries[k]
        assert s.n_images == 1000
        assert s.recall >= r - TOLERANCE and s.precision >= p - TOLERANCE and s.f1 >= f1 - TOLERANCE, (k, s.row())
        assert s.f1 == pytest.approx(f1, abs=0.02)  # a big jump means the test set or the metric changed
