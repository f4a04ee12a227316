"""Local training and validation of one site (MONAI), independent of FLARE.

The FLARE executor is a thin adapter over :class:`LocalTrainer`: it hands in the global
weights, calls :meth:`LocalTrainer.train` and :meth:`LocalTrainer.evaluate`, and ships the
result. Everything numeric here is MONAI/PyTorch: UNet (from the task), DiceCE loss,
sliding-window inference for patch-trained 3D tasks, AMP on CUDA; validation scores the way
the task's challenge does (:mod:`adpfl.metrics`, on the original image grid).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from monai.data import CacheDataset, DataLoader, ThreadDataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss

from adpfl.metrics import ScoreAccumulator, score_case, scoring_for
from adpfl.tasks.base import SegTask
from adpfl.tasks.network import TRAINABLE, set_trainable
from adpfl.training.original_grid import OriginalGrid

__all__ = ["TrainConfig", "LocalTrainer", "resolve_device"]


def resolve_device(device: str = "auto") -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available on this machine")
    return dev


@dataclass
class TrainConfig:
    """Local training settings of one site (all set from the job definition).

    Each field's ``metadata`` holds its help text and unit: the README's settings table is
    rendered from it (``python -m adpfl.settings``).
    """

    local_epochs: int = field(default=2, metadata={"help": "local epochs per round", "unit": "epochs"})
    batch_size: int = field(default=8, metadata={"help": "local batch size", "unit": "cases"})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of local training"})
    max_steps_per_round: int | None = field(default=None, metadata={
        "help": "cap on local optimizer steps per round (None: no cap, `local_epochs` full epochs)",
        "unit": "steps"})
    amp: bool = field(default=True, metadata={"help": "mixed precision (used only on CUDA)"})
    image_size: int | None = field(default=None, metadata={
        "help": "training image size, one int for every axis (None: the task's default, 128 for 2D, 64^3 for 3D)",
        "unit": "voxels per axis"})
    trainable: str = field(default="all", metadata={
        "help": "which parameters local training updates: `all`, `decoder` (the UNet's up-sampling path) or "
                "`head` (its output block); the rest keeps the global model's values. With a public warm start, "
                "fewer trained parameters means less DP-SGD noise per step (the noise has their dimension)"})
    device: str = field(default="auto", metadata={"help": "`auto` (CUDA when present), `cpu` or `cuda[:N]`"})
    num_workers: int = field(default=0, metadata={"help": "data-loader worker processes"})
    seed: int | None = field(default=None, metadata={
        "help": "seed of the run's non-private randomness: the server's initial model, and each site's shuffling "
                "and augmentation (mixed with the site name); None: fresh every run. Never the privacy randomness "
                "(noise, Poisson sampling, masks: always OS entropy)"})

    def validate(self) -> None:
        """Raises ValueError naming the first invalid setting."""

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        checks = [
            ("local_epochs", self.local_epochs, is_int(self.local_epochs) and self.local_epochs >= 1, "an int >= 1"),
            ("batch_size", self.batch_size, is_int(self.batch_size) and self.batch_size >= 1, "an int >= 1"),
            ("learning_rate", self.learning_rate,
             isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 10, "in (0, 10)"),
            ("max_steps_per_round", self.max_steps_per_round,
             self.max_steps_per_round is None or (is_int(self.max_steps_per_round) and self.max_steps_per_round >= 1),
             "None (no cap) or an int >= 1"),
            ("num_workers", self.num_workers, is_int(self.num_workers) and self.num_workers >= 0, "an int >= 0"),
            ("image_size", self.image_size,
             self.image_size is None
             or (is_int(self.image_size) and self.image_size >= 16)
             or (isinstance(self.image_size, (tuple, list)) and all(is_int(v) and v >= 16 for v in self.image_size)),
             "None (the task's default) or an int >= 16 (or one per axis)"),
            ("seed", self.seed, self.seed is None or (is_int(self.seed) and self.seed >= 0), "None or an int >= 0"),
            ("trainable", self.trainable, self.trainable in TRAINABLE, f"one of {TRAINABLE}"),
        ]
        for name, value, ok, rule in checks:
            if not ok:
                raise ValueError(f"invalid training setting {name}={value!r}: must be {rule}")


class LocalTrainer:
    """Trains and evaluates a model on one site's datalist."""

    def __init__(self, task: SegTask, datalist: dict[str, list[dict]], config: TrainConfig):
        config.validate()
        self.task = task
        self.config = config
        self.device = resolve_device(config.device)
        self.size = task.resolve_size(config.image_size)
        train_items = list(datalist.get("training") or [])
        val_items = list(datalist.get("validation") or [])
        if not train_items:
            raise ValueError(f"site has no training cases (task {task.name})")
        self.num_train = len(train_items)
        self.num_val = len(val_items)
        self.val_items = val_items
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the deterministic transforms run once here; per item only the random 3D patch
            # sampler runs each epoch, which reads the cached items and never modifies them:
            # no defensive copy of each item. Flips and intensity jitter run on the batch.
            self.train_ds = CacheDataset(
                train_items, transform=task.train_transforms(self.size), cache_rate=1.0, progress=False,
                copy_cache=False,
            )
            val_transform = task.val_transforms(self.size)
            self.val_ds = (
                CacheDataset(val_items, transform=val_transform, cache_rate=1.0, progress=False)
                if val_items
                else None
            )
        self._grid = OriginalGrid(task, val_transform)
        self.augment = task.batch_augment(self.size)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.use_amp = bool(config.amp) and self.device.type == "cuda"
        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_model_id: int | None = None
        self._scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        #: the site's own generator for shuffling and augmentation when the run is seeded
        #: (sites running in one process then do not share torch's global RNG)
        self._rng = None if config.seed is None else torch.Generator().manual_seed(int(config.seed))

    # -- training ---------------------------------------------------------------------
    def _loader(self, shuffle: bool, ds, batch_size: int) -> DataLoader:
        # MONAI's ThreadDataLoader: the next batch's random transforms run in a thread while
        # the current batch trains (the cached dataset needs no worker processes)
        return ThreadDataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
            generator=self._rng if shuffle else None,
        )

    def augment_batch(self, x: torch.Tensor, y: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's random augmentation of one collated batch (per-sample draws from
        ``generator``, on the batch's device); unchanged when the task has none."""
        if self.augment is None:
            return x, y
        return self.augment(x, y, generator)

    def augment_generator(self) -> torch.Generator:
        """A generator for one round's augmentation draws, seeded from the site's seeded
        generator, or else from torch's default one (as MONAI's DataLoader seeds per-item
        transforms): ``torch.manual_seed`` then makes the draws reproducible."""
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=self._rng).item()))

    def optimizer_for(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """One Adam optimizer per site, kept across rounds (its moments are local state), over
        the parameters setting ``trainable`` names (frozen here first)."""
        set_trainable(model, self.config.trainable)
        if self._optimizer is None or self._optimizer_model_id != id(model):
            params = [p for p in model.parameters() if p.requires_grad]
            self._optimizer = torch.optim.Adam(params, lr=self.config.learning_rate)
            self._optimizer_model_id = id(model)
        return self._optimizer

    def train(
        self,
        model: torch.nn.Module,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, float], None] | None = None,
    ) -> dict[str, float]:
        """Run the local epochs; returns mean loss, steps, samples seen and seconds."""
        model.to(self.device).train()
        opt = self.optimizer_for(model)
        loader = self._loader(True, self.train_ds, self.config.batch_size)
        gen = self.augment_generator()
        steps, samples, loss_sum = 0, 0, 0.0
        t0 = time.perf_counter()
        cap = self.config.max_steps_per_round or math.inf
        for _epoch in range(self.config.local_epochs):
            for batch in loader:
                if should_stop is not None and should_stop():
                    return {"loss": loss_sum / max(steps, 1), "steps": steps, "samples": samples,
                            "seconds": time.perf_counter() - t0, "aborted": True}
                x = batch["image"].to(self.device, non_blocking=True)
                y = batch["label"].to(self.device, non_blocking=True)
                x, y = self.augment_batch(x, y, gen)
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", enabled=self.use_amp):
                    loss = self.loss_fn(model(x), y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"local training loss became {loss.item()} at step {steps}")
                self._scaler.scale(loss).backward()
                self._scaler.step(opt)
                self._scaler.update()
                steps += 1
                samples += x.shape[0]
                loss_sum += float(loss.detach())
                if on_step is not None:
                    on_step(steps, float(loss.detach()))
                if steps >= cap:
                    break
            if steps >= cap:
                break
        return {"loss": loss_sum / max(steps, 1), "steps": steps, "samples": samples,
                "seconds": time.perf_counter() - t0, "aborted": False}

    # -- evaluation -------------------------------------------------------------------
    def _predict(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", enabled=self.use_amp):
            if self.task.patch_size is not None and tuple(x.shape[2:]) != tuple(self.task.patch_size):
                return sliding_window_inference(x, self.task.patch_size, sw_batch_size=4, predictor=model, overlap=0.25)
            return model(x)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, with_hd95: bool = True) -> dict[str, float | None]:
        """Scores of the site's validation set, the way the task's challenge scores
        (:mod:`adpfl.metrics`): each prediction is taken back to the case's original grid
        and compared with its original label, distances in mm from the file's spacing.

        Keys: ``dice_<region>``, ``hd95_<region>`` (voxel-wise: both empty Dice 1 / HD95 0,
        one empty Dice 0 / HD95 the task's penalty), the task's challenge metrics
        (``lesion_dice_<region>``/``lesion_hd95_<region>`` for BraTS, ``sdice_<region>`` for
        KiTS, ``tjaccard_<region>`` for ISIC), and ``<family>_mean`` over regions. A value
        over no case is ``None`` ("no cases"), never 0.
        """
        if self.val_ds is None:
            raise ValueError(f"site has no validation cases (task {self.task.name}); cannot evaluate")
        model.to(self.device).eval()
        scoring = scoring_for(self.task.name)
        acc = ScoreAccumulator(self.task.regions, scoring, with_hd95=with_hd95)
        for i, item in enumerate(self.val_items):
            d = self.val_ds[i]
            x = torch.as_tensor(d["image"]).unsqueeze(0).to(self.device)
            pred = self._predict(model, x).float().argmax(dim=1, keepdim=True)[0]
            gt, spacing = self._grid.label(item)
            try:
                case = score_case(self._grid.prediction(pred, d), gt, self.task.regions, scoring, spacing, with_hd95)
            except ValueError as e:
                raise ValueError(f"validation case {item.get('label')}: {e}") from e
            acc.add(case)
        return acc.summary()
