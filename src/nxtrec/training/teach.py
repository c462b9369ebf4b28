"""`nxtrec teach`: train a low-rank adapter (nxtrec.model.adapter) on a few examples of new
labels, with the paper's sequence and loss (training/text.py, training/step.py), replay
against forgetting, a held-out split with early stopping, and exact resume (docs/teach.md).

Determinism: every batch is a pure function of (seed, step), the thread count is fixed and
PyTorch's deterministic algorithms are on, so a seed gives the same adapter bytes, and a run
killed at any point and resumed from its last checkpoint gives the same adapter as one run."""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from nxtrec.digests import model_digest
from nxtrec.inference.engine import Preprocessing
from nxtrec.inference.recognizer import Recognizer
from nxtrec.model.adapter import (AdapterInfo, attach_lora, detach_lora, load_lora_state, lora_state,
                                  save_adapter, target_names)  # fmt: skip
from nxtrec.model.directory import default_model_dir, load_model_dir
from nxtrec.training.augment import random_views
from nxtrec.training.step import TrainStep
from nxtrec.training.teach_data import (Example, ExamplesError, distilled, examples_digest, read_examples,
                                        replay_scenes, split_examples, taught_labels)  # fmt: skip
from nxtrec.training.text import make_text_batch

STATE_FILE = ".teach-state.pt"  # the checkpoint inside the output folder; removed when done
MAX_TEXT_TOKENS = 64


@dataclass(frozen=True)
class TeachOptions:
    rank: int = 8
    alpha: float = 16.0
    encoder_blocks: int = 0  # also adapt the last N encoder blocks (and the projection)
    steps: int = 300  # at most; early stopping may end sooner
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    held_out: float = 0.2  # fraction of each label's examples held out
    eval_every: int = 25  # steps between held-out evaluations (and checkpoints)
    patience: int = 4  # evaluations without improvement before stopping
    replay: float = 0.5  # fraction of each batch drawn from replay scenes (when any)
    replay_scenes: int | None = None  # None: 400 for the bundled model, 0 otherwise
    distill_min_prob: float = 0.3  # the model's own labels kept as targets from this probability
    output_rows: bool = True  # also adapt the output layer's rows of the taught labels' tokens
    threads: int = 2


@dataclass
class TeachData:
    train: list[Example]
    held: list[Example]
    replay: list[Example]
    before: list  # the base model's top-10 labels of the held-out examples (the training ones when none)


class Teacher:
    """One teach run: the model with its adapter layers, the data, the optimizer."""

    def __init__(self, model_dir, examples: list[Example], out: Path, options: TeachOptions):
        self.options, self.out = options, out
        self.model_dir = Path(model_dir or default_model_dir())
        self.model, self.tokenizer = load_model_dir(self.model_dir, dtype="float32")
        self.labels = taught_labels(examples)
        self.info_base = dict(base_model=model_digest(self.model_dir), examples=examples_digest(examples))
        cfg = self.model.config
        self.pre = Preprocessing(cfg.encoder.image_size, tuple(cfg.image_mean), tuple(cfg.image_std))
        self.pixels: dict[int, torch.Tensor] = {}  # id(example.image) -> [3, S, S]
        self.data = self._data(examples)
        self.names = target_names(self.model, options.encoder_blocks)
        self.output_rows = label_token_ids(self.tokenizer, self.labels) if options.output_rows else []
        self.layers = attach_lora(self.model, self.names, options.rank, options.alpha, options.seed, self.output_rows)
        self.model.train()
        self.step_fn = TrainStep(self.model, self.tokenizer.delimiter_id, self.tokenizer.pad_id)
        params = [p for layer in self.layers.values() for p in layer.trained().values()]
        self.optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)

    def _data(self, examples: list[Example]) -> TeachData:
        o = self.options
        train, held = split_examples(examples, o.held_out, o.seed)
        n_replay = o.replay_scenes
        if n_replay is None:
            n_replay = 400 if self.info_base["base_model"] == model_digest(default_model_dir()) else 0
        replay = replay_scenes(n_replay, o.seed)
        for ex in train + held + replay:
            self.pixels[id(ex.image)] = torch.from_numpy(self.pre.stack([ex.image])[0])
        own = self.predict(Recognizer(self.model, self.tokenizer), train + held, top_k=10)
        both = distilled(train + held, own, o.distill_min_prob)
        n = len(train)
        return TeachData(both[:n], both[n:], replay, own[n:] if held else own[:n])

    def predict(self, rec: Recognizer, examples: list[Example], top_k: int):
        was_training = self.model.training
        self.model.eval()
        out = []
        for i in range(0, len(examples), 32):
            batch = torch.stack([self.pixels[id(ex.image)] for ex in examples[i:i + 32]])
            out += rec.predict_batch(batch, top_k=top_k)
        self.model.train(was_training)
        return out

    def batch(self, step: int) -> tuple[torch.Tensor, list[tuple[str, ...]], random.Random]:
        """The examples of optimizer step `step`: a pure function of (seed, step)."""
        o, d = self.options, self.data
        rng = random.Random(f"nxtrec-teach/{o.seed}/{step}")
        n_replay = round(o.batch_size * o.replay) if d.replay else 0
        chosen = rng.choices(d.train, k=o.batch_size - n_replay) + (rng.choices(d.replay, k=n_replay) if n_replay else [])
        pixels = random_views(torch.stack([self.pixels[id(ex.image)] for ex in chosen]), rng)
        return pixels, [ex.labels for ex in chosen], rng

    def loss(self, pixels, labels, rng) -> torch.Tensor:
        p = self.model.num_image_tokens
        text = make_text_batch(self.tokenizer, labels, self.model.config.prompt, rng, p, p + MAX_TEXT_TOKENS,
                               image_token=self.model.config.image_token, close_last=True)  # fmt: skip
        total, count = self.step_fn(pixels, text.tokens, text.targets, text.answer_index)
        return total / count.clamp(min=1)

    def train_step(self, step: int) -> float:
        loss = self.loss(*self.batch(step))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """The loss of the taught labels alone on the held-out examples: what early stopping
        watches (the old labels' loss would hide whether the new ones are learned)."""
        examples = self.data.held or self.data.train
        pixels = torch.stack([self.pixels[id(ex.image)] for ex in examples])
        labels = [[lab for lab in ex.labels if lab in self.labels] for ex in examples]
        return float(self.loss(pixels, labels, random.Random(f"nxtrec-teach-held/{self.options.seed}")))

    def fingerprint(self) -> str:
        return repr((self.info_base, asdict(self.options)))


def label_token_ids(tokenizer, labels: list[str]) -> list[int]:
    """The vocabulary pieces the labels are written with (as they follow a space in the
    sequence), less the delimiter and the special tokens: the output rows an adapter trains."""
    shared = {tokenizer.delimiter_id, *tokenizer.special_ids.values()}
    return sorted({i for label in labels for i in tokenizer.encode(label)} - shared)


def teach(model_dir, examples: str | Path | list[Example], out, options: TeachOptions = TeachOptions(),
          progress: bool = True) -> AdapterInfo:
    """Train an adapter on `examples` (a list, or a source `read_examples` reads as "auto")
    and write it to `out`; resumes from `out`'s checkpoint when one of the same run (same
    model, examples and options) is there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExamplesError(f"{out}: exists and is not a folder; choose another --out")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(options.threads)
    torch.use_deterministic_algorithms(True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        examples = read_examples(examples) if isinstance(examples, (str, Path)) else list(examples)
        teacher = Teacher(model_dir, examples, out, options)
        loop = TrainingState.start(teacher)
        loop.run(progress)
        return finish(teacher, loop)
    finally:  # the caller's settings back (the Python API)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


@dataclass
class TrainingState:
    """What a checkpoint holds besides the optimizer: the step reached, the best adapter so far
    and its held-out loss, and how many evaluations have not improved on it."""

    teacher: Teacher
    step: int
    best: dict
    best_loss: float
    stale: int
    history: list

    @classmethod
    def start(cls, teacher: Teacher) -> "TrainingState":
        path = teacher.out / STATE_FILE
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            if saved.get("fingerprint") == teacher.fingerprint():
                load_lora_state(teacher.layers, saved["lora"])
                teacher.optimizer.load_state_dict(saved["optimizer"])
                return cls(teacher, saved["step"], saved["best"], saved["best_loss"], saved["stale"], saved["history"])
        first = teacher.held_out_loss()
        return cls(teacher, 0, lora_state(teacher.layers), first, 0, [(0, first)])

    def run(self, progress: bool) -> None:
        from tqdm import tqdm

        t, o = self.teacher, self.teacher.options
        bar = tqdm(total=o.steps, initial=self.step, desc="teach", unit="step", disable=None if progress else True)
        while self.step < o.steps and self.stale < o.patience:
            loss = t.train_step(self.step)
            self.step += 1
            bar.update(1)
            if self.step % o.eval_every == 0 or self.step == o.steps:
                held = t.held_out_loss()
                self.history.append((self.step, held))
                if held < self.best_loss:
                    self.best, self.best_loss, self.stale = lora_state(t.layers), held, 0
                else:
                    self.stale += 1
                bar.set_postfix(loss=f"{loss:.3f}", held_out=f"{held:.3f}")
                self.save()
        bar.close()

    def save(self) -> None:
        """Atomically: a temporary file, flushed to the disk, renamed over the old checkpoint."""
        t = self.teacher
        state = dict(fingerprint=t.fingerprint(), step=self.step, lora=lora_state(t.layers),
                     optimizer=t.optimizer.state_dict(), best=self.best, best_loss=self.best_loss,
                     stale=self.stale, history=self.history)  # fmt: skip
        tmp = t.out / (STATE_FILE + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, t.out / STATE_FILE)


def finish(teacher: Teacher, loop: TrainingState) -> AdapterInfo:
    """Merge the best adapter, measure before/after on the held-out examples, write the
    adapter folder and drop the checkpoint."""
    o, d = teacher.options, teacher.data
    examples = d.held or d.train
    load_lora_state(teacher.layers, loop.best)
    best = lora_state(teacher.layers)
    detach_lora(teacher.model, teacher.layers, merge=True)
    after = teacher.predict(Recognizer(teacher.model, teacher.tokenizer), examples, top_k=10)
    figures = dict(split="held-out" if d.held else "training (too few examples to hold any out)",
                   examples=len(examples), steps=loop.step, best_held_out_loss=round(loop.best_loss, 4),
                   history=[[s, round(v, 4)] for s, v in loop.history],
                   **before_after(examples, d.before, after, teacher.labels))  # fmt: skip
    settings = {k: v for k, v in asdict(o).items() if k != "threads"}
    settings.update(train_examples=len(d.train), held_out_examples=len(d.held), replay_scenes=len(d.replay))
    info = AdapterInfo(rank=o.rank, alpha=o.alpha, targets=teacher.names, labels=teacher.labels,
                       output_rows=teacher.output_rows, figures=figures, settings=settings,
                       **teacher.info_base)  # fmt: skip
    save_adapter(teacher.out, best, info)
    (teacher.out / STATE_FILE).unlink(missing_ok=True)
    return info


def before_after(examples: list[Example], before, after, taught: list[str]) -> dict:
    """recall@5 of the taught labels, and how many of the labels the model gave before (other
    than the taught ones) it still gives in its top 10."""
    def recall(preds) -> float:
        hits = [lab in [x.label for x in p[:5]] for ex, p in zip(examples, preds) for lab in ex.labels if lab in taught]
        return round(float(np.mean(hits)), 4) if hits else 0.0

    kept = [lab.label in {x.label for x in a} for b, a in zip(before, after) for lab in b[:5] if lab.label not in taught]
    return {"recall@5_taught_before": recall(before), "recall@5_taught_after": recall(after),
            "old_top5_kept_in_top10": round(float(np.mean(kept)), 4) if kept else 1.0}
