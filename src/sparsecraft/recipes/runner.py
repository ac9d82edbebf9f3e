"""Running a recipe: build model and data, apply the sparsity method, train, log, report.

Single-run methods (dense, static, random, snip, grasp, synflow, gmp, spdf) checkpoint after every
epoch (model with masks, optimizer, LR schedule, sparsifier, RNG) and resume from it exactly.
IMP and SMS restart from the beginning (their unit of work is a whole training run).
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsecraft.analysis.report import SparsityReport, report
from sparsecraft.analysis.training_flops import TrainingFlops, layer_densities
from sparsecraft.core.masking import load_sparse_state_dict
from sparsecraft.core.prune import prune, selection_sparsity
from sparsecraft.core.selection import select
import sparsecraft.data  # noqa: F401  (registers the built-in datasets)
from sparsecraft.data.images import Split
from sparsecraft.errors import DensityError, SparsecraftError
from sparsecraft.methods.at_init import grasp_prune, random_prune, snip_prune, synflow_prune
from sparsecraft.methods.dst import SET, GraNet, RigL
from sparsecraft.methods.gmp import GradualMagnitudePruning
from sparsecraft.methods.nm_training import NMTraining
from sparsecraft.methods.imp import iterative_magnitude_pruning
from sparsecraft.methods.soups import release_masks, sparse_model_soups
from sparsecraft.methods.sparse_ift import sparse_wide_model
from sparsecraft.models import create
from sparsecraft.recipes.schema import Recipe
from sparsecraft.registry import DATASETS
from sparsecraft.train.trainer import evaluate, fit, make_optimizer, steps_per_epoch, task_loss
from sparsecraft.utils import atomic_path, write_text_atomic

RESUMABLE = ("dense", "static", "random", "snip", "grasp", "synflow", "gmp", "spdf", "set", "rigl", "granet", "nm")
#: Methods whose sparsifier sets the masks itself (no pruning at initialisation by the runner).
OWN_MASKS = ("dense", "gmp", "set", "rigl", "granet", "nm")


@dataclass
class RunResult:
    accuracy: float
    sparsity: float
    report: SparsityReport | None  # None when the run was stopped early on purpose
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    train_flops: float = float("nan")  # see sparsecraft.analysis.training_flops
    train_flops_vs_dense: float = float("nan")  # relative to one dense run of the recipe


def load_data(spec: str, **kwargs: Any) -> Split:
    """A built-in dataset name or ``package.module:callable`` returning a :class:`Split`."""
    if ":" in spec:
        module, _, attr = spec.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    else:
        factory = DATASETS.get(spec)
    split = factory(**kwargs)
    if not isinstance(split, Split):
        raise SparsecraftError(f"data {spec!r} returned {type(split).__name__}; return sparsecraft.data.Split(x_train, y_train, x_test, y_test)")
    return split


def _prune_options(recipe: Recipe) -> dict[str, Any]:
    s = recipe.sparsity
    return {
        "pattern": s.pattern,
        "types": s.types,
        "include": s.include,
        "exclude": s.exclude,
        "keep_first_dense": s.keep_first_dense,
        "keep_last_dense": s.keep_last_dense,
    }


def _steps(value: int | float, total: int) -> int:
    return int(round(value * total)) if isinstance(value, float) else int(value)


def _calibration(split: Split, recipe: Recipe) -> list[tuple[torch.Tensor, torch.Tensor]]:
    b = recipe.train.batch_size
    return [(split.x_train[i * b : (i + 1) * b], split.y_train[i * b : (i + 1) * b]) for i in range(recipe.sparsity.batches)]


def _loss(model: nn.Module, batch: Any, temperature: float = 1.0) -> torch.Tensor:
    x, y = batch
    return task_loss(model(x) / temperature, y)


def prune_at_init(model: nn.Module, split: Split, recipe: Recipe, overrides: dict[str, Any] | None = None) -> None:
    s, options = recipe.sparsity, {**_prune_options(recipe), **(overrides or {})}
    sparsity = s.sparsity if ":" not in s.pattern else None
    if s.method in ("static", "spdf"):
        prune(model, sparsity=sparsity, **{"distribution": s.distribution, **options}, score="magnitude")
    elif s.method == "random":
        random_prune(model, sparsity, **{"distribution": s.distribution, **options}, seed=recipe.seed)  # type: ignore[arg-type]
    elif s.method == "snip":
        snip_prune(model, sparsity, _loss, _calibration(split, recipe), **options)  # type: ignore[arg-type]
    elif s.method == "grasp":
        grasp_prune(model, sparsity, _loss, _calibration(split, recipe), **options)  # type: ignore[arg-type]
    elif s.method == "synflow":
        synflow_prune(model, sparsity, input_shape=tuple(split.x_train.shape[1:]), rounds=max(s.rounds, 1), **options)  # type: ignore[arg-type]


class Run:
    """One recipe run with its output folder, metrics log and checkpoints."""

    def __init__(self, recipe: Recipe, output: str | Path | None = None, progress: bool = True, log: Callable[[str], None] = print) -> None:
        self.recipe = recipe
        self.output = Path(output or recipe.output or "runs/run")
        self.progress = progress
        self.log = log
        self.history: list[dict[str, Any]] = []
        self.flops: TrainingFlops | None = None
        self.dense_flops_per_sample = float("nan")  # of the recipe's dense model (Sparse-IFT: before widening)
        self.overrides: dict[str, Any] = {}  # Sparse-IFT: mapping distribution over the sparse parts

    # -- bookkeeping -----------------------------------------------------------------------
    def _metrics(self, **row: Any) -> None:
        self.history.append(row)
        self.output.mkdir(parents=True, exist_ok=True)
        with open(self.output / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _save_checkpoint(self, state: dict[str, Any]) -> None:
        with atomic_path(self.output / "checkpoint.pt") as tmp:
            torch.save(state, tmp)

    def _account(self, model: nn.Module, sparsifier: Any, step: int, n_train: int) -> None:
        """Training FLOPs of ``step`` (1-based), counted before the sparsifier's update for it."""
        if self.flops is None:
            return
        b = self.recipe.train.batch_size
        position = (step - 1) % steps_per_epoch(n_train, b)
        self.flops.add_step(layer_densities(model, sparsifier), min(b, n_train - position * b))

    # -- the run ---------------------------------------------------------------------------
    def run(self, resume: bool = False, stop_after_epoch: int | None = None) -> RunResult:
        r = self.recipe
        start = time.perf_counter()
        torch.manual_seed(r.seed)
        split = load_data(r.data, **r.data_args)
        model = create(r.model, **r.model_args)
        example = split.x_train[:1]
        self.dense_flops_per_sample = TrainingFlops.for_model(model, example).dense_flops(1)
        if r.sparsity.sift:
            model, densities = sparse_wide_model(r.model, r.model_args, r.sparsity.sparsity or 0.0, example)
            self.overrides = {"distribution": "mapping", "densities": densities, "include": list(densities)}
            self.log(f"Sparse Wide: {sum(p.numel() for p in model.parameters()):,} parameters, {len(densities)} sparse layers")
        self.flops = TrainingFlops.for_model(model, example)  # dense FLOPs, before any mask
        if not resume and (self.output / "metrics.jsonl").exists():
            (self.output / "metrics.jsonl").unlink()
        method = r.sparsity.method
        if method in ("imp", "sms"):
            if resume:
                raise SparsecraftError(f"resume is supported for {', '.join(RESUMABLE)}; {method} restarts from the beginning")
            model = self._run_multi(model, split)
        else:
            model = self._run_single(model, split, resume, stop_after_epoch)
            if model is None:  # stopped on purpose (tests, time limits): the checkpoint holds the state
                return RunResult(float("nan"), float("nan"), None, time.perf_counter() - start, self.history)
        return self._finish(model, split, start)

    def _run_single(self, model: nn.Module, split: Split, resume: bool, stop_after_epoch: int | None) -> nn.Module | None:
        r, s = self.recipe, self.recipe.sparsity
        optimizer = make_optimizer(model, r.train.optimizer, r.train.lr, r.train.weight_decay)
        per_epoch = steps_per_epoch(len(split.x_train), r.train.batch_size)
        total = r.train.epochs * per_epoch
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        sparsifier = None
        selection = select(model, s.types, self.overrides.get("include", s.include), s.exclude, s.keep_first_dense, s.keep_last_dense)
        if s.method == "gmp":
            start_step, end_step = _steps(s.start, total), _steps(s.end, total)
            n_prunes = max(0, (end_step - start_step) // max(s.frequency, 1))
            sparsifier = GradualMagnitudePruning(
                model, optimizer, final_sparsity=s.sparsity if ":" not in s.pattern else None,
                initial_sparsity=s.initial_sparsity, start_step=max(start_step, 1), frequency=s.frequency,
                n_prunes=n_prunes, total_steps=total, distribution=s.distribution, **_prune_options(r),
            )
        elif s.method in ("set", "rigl", "granet"):
            dst: Any = {"set": SET, "rigl": RigL, "granet": GraNet}[s.method]
            extra = {"initial_sparsity": s.initial_sparsity} if s.method == "granet" else {}
            sparsifier = dst(
                model, optimizer, sparsity=s.sparsity, total_steps=total, update_interval=s.update_interval,
                drop_fraction=s.drop_fraction, end=s.t_end, seed=r.seed,
                **({"decay": s.decay} if s.decay else {}), **extra, **{"distribution": s.distribution, **_prune_options(r), **self.overrides},
            )
        elif s.method == "nm":
            n_text, _, m_text = s.pattern.partition(":")
            sparsifier = NMTraining(
                model, optimizer, n=int(n_text), m=int(m_text), total_steps=total, method=s.nm_method, lam=s.lam,
                decay=s.decay or "linear", decay_coef=s.decay_coef, dense_fraction=s.dense_fraction,
                finetune_fraction=s.finetune_fraction, structure_decay=s.structure_decay,
                **{k: v for k, v in _prune_options(r).items() if k != "pattern"},
            )
        act = r.activation  # ProSparse: ReLU before training, L1 on the activations during it, FATReLU after
        from sparsecraft.methods.activation.relufication import ActivationL1, ProSparseSchedule, relufy, shift_threshold

        if act.relufy:
            self.log(f"relufy: {len(relufy(model, act.modules))} activations replaced by ReLU")
        l1 = None
        if act.l1_stages is not None:
            schedule = ProSparseSchedule(act.l1_stages, act.l1_initial, act.l1_warmup_steps)
            l1 = ActivationL1(model, schedule, act.modules, act.l1_reduction)
        start_epoch = 0
        if resume:
            state = torch.load(self.output / "checkpoint.pt", weights_only=False)
            load_sparse_state_dict(model, state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if sparsifier is not None:
                sparsifier.load_state_dict(state["sparsifier"])
            if l1 is not None:
                l1.load_state_dict(state["activation_l1"])
            torch.set_rng_state(state["rng"])
            if self.flops is not None and state.get("flops"):
                self.flops.load_state_dict(state["flops"])
            start_epoch = state["epoch"] + 1
            self.log(f"resumed from {self.output / 'checkpoint.pt'} at epoch {start_epoch}")
        elif s.method not in OWN_MASKS:
            prune_at_init(model, split, r, self.overrides)

        stopped = False

        def on_epoch_end(epoch: int, loss: float) -> None:
            nonlocal stopped
            acc = evaluate(model, split.x_test, split.y_test)
            sparsity = selection_sparsity(model, selection)
            # the hooks hold the last forward, i.e. the last evaluation batch
            extra = {"activation_zeros": l1.zero_fraction(), "l1_lambda": l1.lam} if l1 is not None else {}
            self._metrics(epoch=epoch + 1, loss=loss, accuracy=acc, sparsity=sparsity, lr=scheduler.get_last_lr()[0], **extra)
            self._save_checkpoint({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "sparsifier": sparsifier.state_dict() if sparsifier else None, "rng": torch.get_rng_state(), "epoch": epoch,
                "flops": self.flops.state_dict() if self.flops else None,
                "activation_l1": l1.state_dict() if l1 is not None else None,
            })
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                stopped = True
                raise _Stop

        def on_step(step: int) -> None:
            self._account(model, sparsifier, step, len(split.x_train))
            if sparsifier is not None:
                sparsifier.step()
            if l1 is not None:
                l1.step()

        try:
            fit(model, split.x_train, split.y_train, optimizer, r.train.epochs, r.train.batch_size, seed=r.seed,
                on_step=on_step, progress=self.progress, description=s.method,
                scheduler=scheduler, start_epoch=start_epoch, on_epoch_end=on_epoch_end,
                extra_loss=l1.penalty if l1 is not None else None)
        except _Stop:
            pass
        finally:
            if l1 is not None:
                l1.remove()
        if stopped:
            return None
        if isinstance(sparsifier, NMTraining):
            sparsifier.finalize()  # the target N:M mask baked into the weights
        if s.method == "spdf":
            release_masks(model)
            self.log(f"SPDF: masks released, dense fine-tuning for {s.dense_epochs} epochs")
            dense_opt = make_optimizer(model, r.train.optimizer, r.train.lr * 0.1, r.train.weight_decay)
            fit(model, split.x_train, split.y_train, dense_opt, s.dense_epochs, r.train.batch_size, seed=r.seed + 1,
                on_step=lambda step: self._account(model, None, step, len(split.x_train)),
                progress=self.progress, description="spdf dense")
        if act.fatrelu is not None:
            self.log(f"FATReLU: threshold {act.fatrelu} on {len(shift_threshold(model, act.fatrelu, act.modules))} activations")
        return model

    def _run_multi(self, model: nn.Module, split: Split) -> nn.Module:
        r, s = self.recipe, self.recipe.sparsity
        per_epoch = steps_per_epoch(len(split.x_train), r.train.batch_size)
        total = r.train.epochs * per_epoch

        def make_opt(m: nn.Module):
            opt = make_optimizer(m, r.train.optimizer, r.train.lr, r.train.weight_decay)
            return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)

        if s.method == "imp":
            def train(m, opt, sched, start_step, on_step):
                def step_hook(step: int) -> None:
                    self._account(m, None, step, len(split.x_train))
                    if on_step is not None:
                        on_step(step)

                fit(m, split.x_train, split.y_train, opt, r.train.epochs, r.train.batch_size, seed=r.seed,
                    on_step=step_hook, progress=self.progress, description="imp", scheduler=sched, start_epoch=start_step // per_epoch)

            if s.rewind_step % per_epoch:
                raise DensityError(f"imp: rewind_step {s.rewind_step} must be a multiple of the {per_epoch} steps per epoch")
            return iterative_magnitude_pruning(
                model, make_opt, train, s.sparsity, rounds=s.rounds, rewind_step=s.rewind_step, total_steps=total,  # type: ignore[arg-type]
                distribution=s.distribution, on_round=lambda k, t: self.log(f"imp round {k}: sparsity {t:.4f}"), **_prune_options(r),
            )

        opt, sched = make_opt(model)  # sms: a dense model first, then prune-retrain phases of soups
        fit(model, split.x_train, split.y_train, opt, r.train.epochs, r.train.batch_size, seed=r.seed,
            on_step=lambda step: self._account(model, None, step, len(split.x_train)),
            progress=self.progress, description="sms dense", scheduler=sched)

        def retrain(member: nn.Module, k: int) -> None:
            o, sc_ = make_opt(member)
            fit(member, split.x_train, split.y_train, o, r.train.epochs, r.train.batch_size, seed=r.seed + 1000 * (k + 1),
                on_step=lambda step: self._account(member, None, step, len(split.x_train)),
                progress=self.progress, description=f"sms member {k}", scheduler=sc_)

        def held_out(m: nn.Module) -> float:
            return evaluate(m, split.x_train[-256:], split.y_train[-256:])

        return sparse_model_soups(
            model, retrain, held_out, s.sparsity, phases=s.rounds, members=s.members, greedy=s.greedy,  # type: ignore[arg-type]
            on_phase=lambda p, t, scores: self.log(f"sms phase {p}: sparsity {t:.4f}, members {[round(x, 4) for x in scores]}"),
            distribution=s.distribution, **_prune_options(r),
        )

    def _finish(self, model: nn.Module, split: Split, start: float) -> RunResult:
        r = self.recipe
        acc = evaluate(model, split.x_test, split.y_test)
        final = report(model, inputs=split.x_test[:1])
        include = self.overrides.get("include", r.sparsity.include)
        selected = {t.name for t in select(model, r.sparsity.types, include, r.sparsity.exclude,
                                           r.sparsity.keep_first_dense, r.sparsity.keep_last_dense)}
        rows = [row for row in final.layers if f"{row.name}.weight" in selected]
        achieved = 1 - sum(x.kept for x in rows) / max(sum(x.weights for x in rows), 1)
        target = r.sparsity.sparsity if r.sparsity.method not in ("dense", "spdf") else None
        if "densities" in self.overrides:  # Sparse-IFT: each layer at its own iso-FLOP density
            density = self.overrides["densities"]
            target = 1 - sum(density[x.name] * x.weights for x in rows) / max(sum(x.weights for x in rows), 1)
        if ":" in r.sparsity.pattern and r.sparsity.method not in ("dense", "spdf"):
            n, m = (int(v) for v in r.sparsity.pattern.split(":"))
            target = 1 - n / m
        self.output.mkdir(parents=True, exist_ok=True)
        flops = {}
        if self.flops is not None:
            dense_run = self.dense_flops_per_sample * r.train.epochs * len(split.x_train)
            flops = {"train_flops": self.flops.total, "train_flops_vs_dense": self.flops.total / dense_run}
        summary = {"recipe": r.to_dict(), "accuracy": acc, "sparsity": achieved, "target_sparsity": target,
                   "seconds": time.perf_counter() - start, **flops, "report": final.to_dict()}
        write_text_atomic(self.output / "result.json", json.dumps(summary, indent=2))
        if target is not None and abs(achieved - target) > 0.01:
            raise DensityError(f"run ended at sparsity {achieved:.4f} but the recipe asked for {target:.4f}; check the schedule")
        return RunResult(acc, achieved, final, summary["seconds"], self.history, **flops)


class _Stop(Exception):
    """Raised inside the epoch callback to stop a run after a checkpoint."""


def run_recipe(recipe: Recipe, output: str | Path | None = None, resume: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> RunResult:
    return Run(recipe, output, progress, log).run(resume=resume)


__all__ = ["Run", "RunResult", "load_data", "run_recipe"]
