"""What a run reports besides log.jsonl: TensorBoard and Weights & Biases sinks (`train.log_to`) and sample
grids drawn during training (`train.sample_every`).

Both sinks are optional extras, written with their own libraries (`torch.utils.tensorboard` needs the
`tensorboard` package), imported on first use: each costs about a second to import and most runs use neither.
A missing package is reported by `check_sinks` before any run directory is made. A resumed run resumes its
sinks, so no curve shows a step twice: TensorBoard purges what an earlier attempt wrote past the checkpoint's
step, and W&B resumes the run whose id the run directory keeps. Only rank 0 writes them (the trainer opens
them there).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from isynth.config import RunConfig
from isynth.errors import IsynthError
from isynth.eval.images import save_grid
from isynth.files import atomic_write_text
from isynth.paradigms.base import Paradigm
from isynth.runs import balanced_labels, generate

TENSORBOARD_DIR, WANDB_ID, SAMPLES_DIR = "tensorboard", "wandb_id.txt", "samples"
GRID_IMAGES, GRID_SEED = 20, 0  # 20: every digit twice, in rows of 5


def check_sinks(names: tuple[str, ...]) -> None:
    """Each sink's package is installed; else one line naming the extra that installs it."""
    for name in names:
        if importlib.util.find_spec(name) is None:  # the tensorboard and wandb packages carry the sinks' names
            raise IsynthError(f"train.log_to={name} needs the {name} package: pip install 'isynth[{name}]'")


def _scalars(rec: dict) -> dict[str, float]:
    """A log record's numbers, its step aside."""
    return {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """RUN/tensorboard/ event files; a scalar per log field, tagged with its name."""

    def __init__(self, out: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        # Events of an earlier attempt past the checkpoint (steps > start_step) are written again: purge them.
        self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=start_step + 1, flush_secs=30)

    def log(self, rec: dict) -> None:
        for key, value in _scalars(rec).items():
            self.writer.add_scalar(key, value, rec["step"])

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self, ok: bool) -> None:
        self.writer.close()


class WandB:
    """A W&B run in RUN/wandb/: offline unless WANDB_MODE says otherwise (it needs no account or network;
    `wandb sync RUN/wandb/offline-run-*` uploads it later); project `isynth` (or WANDB_PROJECT), named after
    the run directory, grouped by paradigm, with the run's config. Its id is kept in RUN/wandb_id.txt, so a
    resumed training run continues the same W&B run."""

    def __init__(self, run: RunConfig, out: Path):
        import wandb
        self.wandb = wandb
        id_path = out / WANDB_ID
        if id_path.is_file():
            run_id = id_path.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # uuid, not torch or numpy: training's random streams stay as they are
            atomic_write_text(id_path, run_id + "\n")
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "isynth"), name=out.name,
                                  group=run.paradigm, id=run_id, resume="allow", dir=str(out),
                                  mode=os.environ.get("WANDB_MODE", "offline"), config=run.to_dict(),
                                  settings=wandb.Settings(console="off"))  # isynth's own output stays as it is
        except wandb.errors.Error as e:
            raise IsynthError(f"wandb could not start a run ({' '.join(str(e).split())}); WANDB_MODE=offline "
                              "logs without an account or network") from None

    def log(self, rec: dict) -> None:
        self.run.log(_scalars(rec), step=rec["step"])

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image, caption=f"step {step}")}, step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class Tracker:
    """The sinks of `train.log_to` behind one small interface: `open` once the start step is known, then
    `log(record)` (the dicts of log.jsonl) and `image(tag, HWC uint8, step)`; closed on leaving the `with`
    block (a failed run is marked so in W&B). Inactive (other DDP ranks) it does nothing."""

    def __init__(self, run: RunConfig, out: Path, active: bool = True):
        self.run, self.out, self.active = run, Path(out), active
        self.sinks: list[TensorBoard | WandB] = []

    def open(self, start_step: int) -> None:
        if not self.active:
            return
        for name in self.run.train.log_sinks:
            self.sinks.append(TensorBoard(self.out, start_step) if name == "tensorboard" else WandB(self.run, self.out))

    def log(self, rec: dict) -> None:
        for sink in self.sinks:
            sink.log(rec)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        for sink in self.sinks:
            sink.image(tag, image, step)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, value, tb) -> None:
        for sink in self.sinks:
            sink.close(ok=kind is None)
        self.sinks = []


class SampleGrids:
    """Every `train.sample_every` steps (and at the last step) a grid of GRID_IMAGES samples of the EMA
    weights, the same labels and seed each time so that grids compare across steps, in
    RUN/samples/step-NNNNNN.png and every sink. A copy of the model samples, so the training model's
    weights and mode are never touched, and the random number generators are restored afterwards: training
    with grids reaches the same weights as without, and resumes exactly."""

    def __init__(self, model: Paradigm, out: Path, every: int, start_step: int):
        self.every, self.dir = every, Path(out) / SAMPLES_DIR
        self.model = copy.deepcopy(model).eval() if every else None  # before compilation, which is not copied
        self.labels = balanced_labels(GRID_IMAGES, model.conditions)
        for path in self.dir.glob("step-*.png") if every else ():  # drawn past the checkpoint: drawn again
            step = path.stem.removeprefix("step-")
            if step.isdigit() and int(step) > start_step:
                path.unlink()

    def due(self, done: int, total: int) -> bool:
        return self.every > 0 and (done % self.every == 0 or done == total)

    def write(self, step: int, ema: dict[str, torch.Tensor], tracker: Tracker) -> Path:
        self.model.load_state_dict(ema)
        cuda = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(GRID_SEED)  # for samplers that also draw from the global generator
            images, _ = generate(self.model, self.labels, seed=GRID_SEED)
        path = save_grid(self.dir / f"step-{step:06d}.png", images)
        if tracker.sinks:
            grid = np.asarray(Image.open(path))
            tracker.image("samples", grid[..., None] if grid.ndim == 2 else grid, step)  # (H, W, C)
        return path
