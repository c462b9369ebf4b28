"""Metrics of a run: JSON lines, TensorBoard, plots."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

from nxtrec.distributed import RankInfo
from nxtrec.extras import install_hint
from nxtrec.training.errors import TrainError

METRICS_FILE = "metrics.jsonl"


class TrainMetrics:
    """Main rank only: JSON lines (`metrics.jsonl`) and TensorBoard. On resume the records
    after the checkpoint's step (written by the interrupted run) are dropped."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError as e:
                warnings.warn(f"TensorBoard logging is off ({e}; {install_hint('tensorboard')})")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise TrainError(f"{run_dir}: no {METRICS_FILE} (is this a run directory?)")
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss and learning-rate curves of a run as one PNG (default RUN_DIR/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if "loss" in r]
    if not records:
        raise TrainError(f"{run_dir}: {METRICS_FILE} has no loss records yet")
    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    lr = [r.get("lr", float("nan")) for r in records]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(steps, loss, lw=0.8, alpha=0.5 if len(loss) > 50 else 1.0, label="loss")
    if len(loss) > 50:
        w = max(len(loss) // 50, 2)
        smooth = [sum(loss[max(0, i - w + 1) : i + 1]) / len(loss[max(0, i - w + 1) : i + 1]) for i in range(len(loss))]
        ax1.plot(steps, smooth, lw=1.5, label=f"mean of {w}")
    ax1.set_ylabel("training loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(steps, lr, color="tab:orange")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("optimizer step")
    ax2.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


class TrainProgress:
    """Main rank only: a progress bar on a terminal; on anything else (a Slurm log) a plain
    line every `log.every` steps, with elapsed time and ETA."""

    def __init__(self, info: RankInfo, log_cfg, start: int, total: int):
        self.every, self.start, self.total = log_cfg.every, start, total
        show = info.main and log_cfg.progress
        self.lines = show and not sys.stderr.isatty()
        self.bar = None
        if show and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        self.t_start = time.perf_counter()

    def update(self, record: dict) -> None:
        step, loss, lr, img_s = record["step"], record["loss"], record["lr"], record["images_per_s"]
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}", refresh=False)
            self.bar.update(1)
        elif self.lines and (step % self.every == 0 or step == self.total):
            elapsed = time.perf_counter() - self.t_start
            eta = elapsed / (step - self.start) * (self.total - step)
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.3e}  {img_s:.1f} img/s  "
                  f"elapsed {hms(elapsed)}  eta {hms(eta)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def say(info: RankInfo, *args) -> None:
    if info.main:
        print(*args, file=sys.stderr, flush=True)
