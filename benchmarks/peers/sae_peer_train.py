#!/usr/bin/env python3
"""Train a PEER library's own TopK / BatchTopK sparse autoencoder on cached activations.

Run it with the python of the peer's own environment (peers are never dependencies of
sparsecraft):

    benchmarks/.venvs/saelens/bin/python  benchmarks/peers/sae_peer_train.py --peer saelens ...
    benchmarks/.venvs/sparsify/bin/python benchmarks/peers/sae_peer_train.py --peer sparsify ...

    python sae_peer_train.py --peer saelens|sparsify --kind topk|batchtopk --cache DIR \
        --expansion 8 --k 32 [--lr LR] --batch-size 4096 --tokens N --seed 0 --threads 2 \
        --out OUT.safetensors --json OUT.json [--set KEY=VALUE ...] [--check-rows N]

(benchmarks/peers/setup_saelens.sh and setup_sparsify.sh make those environments.)

Input: a sparsecraft activation cache. DIR/meta.json = {"format": "sparsecraft-activations",
"version": 1, "d_in": int, "n_tokens": int, "shards": [{"file": ..., "rows": int}, ...], ...};
each shard holds a float32 tensor "x" [rows, d_in] in text order (and int64 "tokens", ignored).
The whole cache is read into memory once. Rows are shuffled with --seed: each pass over the cache
is a fresh permutation (torch.randperm with a torch.Generator seeded by --seed), and the passes
are chained until exactly --tokens rows have been fed, in batches of --batch-size (the last batch
is smaller when --batch-size does not divide --tokens). Both peers get the same row order.

What each peer does (everything below is the peer's own code unless said otherwise)
-----------------------------------------------------------------------------------
saelens (sae-lens, v6 API): sae_lens.TopKTrainingSAE / BatchTopKTrainingSAE built from their
  training configs with the peer's defaults, trained by sae_lens.training.sae_trainer.SAETrainer
  fed by a custom data provider (an iterator of [batch, d_in] tensors), as sae-lens's own
  synthetic-data training (sae_lens.synthetic.training.train_toy_sae) does. Peer defaults kept:
  Adam(0.9, 0.999), lr 3e-4 when --lr is not given, constant LR schedule, no warm-up
  (lr_end = lr/10 as LanguageModelSAERunnerConfig sets it; only cosine schedules use it),
  gradient-norm clipping at 1.0, MSE loss summed over d_in and averaged over the batch, AuxK ON
  (aux_loss_coefficient 1.0; a latent is dead after dead_feature_window = 1000 steps without
  firing; k_aux = d_in // 2), decoder rows initialised to norm 0.1 with W_enc = W_dec.T,
  b_enc = b_dec = 0, apply_b_dec_to_input = True, and rescale_acts_by_decoder_norm = True (the
  top-k is taken on pre-activations times the decoder row norms; the decoder is not renormalised
  during training).
  Note that sae-lens v6 starts b_dec at ZERO and never initialises it from data (sparsify uses
  the first batch's mean): on activations with a large mean, short runs at the default lr stay
  at FVU ~1 or above; --b-dec-init mean (not a sae-lens default, recorded in the notes) gives it
  sparsify's init.
  BatchTopK keeps the k * batch largest activations over the whole batch and learns a global
  threshold as an EMA (topk_threshold_lr 0.01) of the smallest positive kept activation,
  starting from 0 (so it needs some hundreds of steps before the inference L0 comes down to
  about k); sae-lens saves a trained BatchTopK SAE as a JumpReLU SAE with that threshold, and so
  does this script.
  Export: the peer's own process_state_dict_for_saving_inference (what save_inference_model
  writes), which folds the decoder norms into W_enc / b_enc (decoder rows become unit norm) and,
  for BatchTopK, turns topk_threshold into a JumpReLU threshold (one value for every latent; it is
  exported here as the 0-dim "threshold").
  train_seconds = SAETrainer.fit().

sparsify (eai-sparsify, EleutherAI): sparsify.Trainer cannot be fed tensors: it hooks modules of a
  Hugging Face model and runs the model on token batches. So this script hands it a stand-in
  "model" whose input_ids are row positions in the (shuffled) cache and whose hooked module
  ("layers.0", an nn.Identity) outputs the cached activations for those rows: each DataLoader
  batch is one "sequence" of --batch-size tokens. Trainer.fit then runs unchanged: b_dec set to
  the first batch's mean, decoder renormalised to unit rows before every forward, the gradient
  parallel to the decoder rows removed before each step, sparsify's fused TopK encoder and its
  loss (FVU = sum of squared error / total variance of the batch, + auxk_alpha * AuxK +
  multi_topk_fvu / 8), its dead-latent bookkeeping, and its default optimiser: "signum"
  (SignSGD inside schedulefree's ScheduleFreeWrapper, momentum 0.95), with no LR schedule and
  lr = 5e-3 / sqrt(d_sae / 2**14) when --lr is not given. Peer defaults that matter: AuxK is OFF
  (TrainConfig.auxk_alpha = 0.0; dead_feature_threshold = 10M tokens); turn it on with
  --set auxk_alpha=0.03125 (1/32, the value of the TopK paper). Only Trainer.save (checkpoints to
  disk) is replaced by a no-op. After fit, the ScheduleFreeWrapper is switched to eval(), which
  swaps in the averaged weights, exactly as sparsify does before it writes a checkpoint; those are
  the weights exported (their decoder rows are close to, not exactly, unit norm; on very short
  runs they can reconstruct worse than the last training-mode weights, see final_batch_fvu).
  With --set optimizer=adam sparsify uses Adam (bitsandbytes' 8-bit one if installed, not here),
  lr 2e-4 / sqrt(d_sae / 2**14) by default, a 1000-step linear warm-up and a linear decay to 0.
  sparsify has no BatchTopK (activations: "topk" and "groupmax" only): --kind batchtopk exits
  with status 2 and a message.
  train_seconds = Trainer.fit() (includes the per-batch row gather of the stand-in model; the
  saelens data provider does the same gather).

Output tensors (float32, safetensors) and how to encode exactly as the peer does
-------------------------------------------------------------------------------
  W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], and for saelens
  batchtopk also threshold [] (0-dim).
  sparsify layout converted: W_enc = encoder.weight.T (nn.Linear stores [d_sae, d_in]),
  b_enc = encoder.bias; W_dec is already [d_sae, d_in].

  Both peers subtract b_dec from the input before encoding:
      pre   = (x - b_dec) @ W_enc + b_enc                                  # [n, d_sae]
  topk (both peers): keep the k largest entries of pre in each row, ReLU them, zero the rest.
      (saelens takes top-k then ReLU; sparsify ReLU then top-k: the results are the same.)
  batchtopk (saelens; inference form = JumpReLU):
      z = relu(pre) * (pre > threshold)
      (during training it was instead: keep the k * n largest entries of relu(pre) over the
      whole batch; threshold was estimated to match that at inference.)
  decode (both):   x_hat = z @ W_dec + b_dec
  The same convention is written into the safetensors metadata ("encode") and into the JSON.

--b-dec-init {peer,mean} (saelens only; default peer): see above.

--check-rows N re-encodes the first N cache rows with the saved tensors by exactly that
convention and records their FVU (sum((x - x_hat)^2) / sum((x - mean(x))^2)) and mean L0 in the
JSON ("check"), as a test of the export.

JSON: {"peer", "version", "kind", "d_in", "d_sae", "k", "tokens", "batch_size", "lr" (the one
actually used), "train_seconds" (training loop only), "final_loss" (the peer's total training loss
on the last batch: saelens = MSE summed over d_in, mean over batch, + AuxK; sparsify = FVU +
auxk_alpha * AuxK + multi_topk_fvu / 8), "notes", plus "final_batch_fvu" (FVU of the last
training batch with the training-time weights, the same formula for both peers), "steps",
"dead_latents" (peer's own count at the end), "peer_config", "encode", "check" (with
--check-rows)}. Both files are written to a temporary name and then os.replace()d.

--set KEY=VALUE (repeatable; VALUE parsed as JSON, else a string) overrides a field of the peer's
config: saelens: a field of the TopK/BatchTopK training-SAE config or of SAETrainerConfig;
sparsify: a field of SparseCoderConfig or TrainConfig (e.g. auxk_alpha, optimizer=adam,
multi_topk=true). A normalisation that needs a pre-pass (saelens normalize_activations=
"expected_average_only_in") draws its estimate batches from the same row stream first.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if "--progress" not in sys.argv:
    # tqdm reads TQDM_* from the environment when it is imported (torch imports it)
    os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

PEER_DIST = {"saelens": "sae-lens", "sparsify": "eai-sparsify"}
EXIT_UNSUPPORTED = 2


# --------------------------------------------------------------------------- data


def load_cache(cache_dir: Path) -> tuple[torch.Tensor, dict]:
    """Read every shard's "x" into one float32 [rows, d_in] tensor."""
    meta = json.loads((cache_dir / "meta.json").read_text())
    if meta.get("format") != "sparsecraft-activations" or int(meta.get("version", -1)) != 1:
        raise SystemExit(f"{cache_dir}/meta.json: not a sparsecraft-activations v1 cache")
    d_in = int(meta["d_in"])
    shards = meta["shards"]
    total = sum(int(s["rows"]) for s in shards)
    if total == 0:
        raise SystemExit(f"{cache_dir}: the cache has no rows")
    if "n_tokens" in meta and int(meta["n_tokens"]) != total:
        print(f"warning: meta n_tokens={meta['n_tokens']} but shards hold {total} rows; "
              f"using the shards", file=sys.stderr)
    X = torch.empty(total, d_in, dtype=torch.float32)
    off = 0
    for s in shards:
        rows = int(s["rows"])
        with safe_open(str(cache_dir / s["file"]), framework="pt") as f:
            shape = list(f.get_slice("x").get_shape())
            if shape != [rows, d_in]:
                raise SystemExit(f"{s['file']}: x has shape {shape}, meta says [{rows}, {d_in}]")
            x = f.get_tensor("x")
        X[off:off + rows] = x.to(torch.float32)
        off += rows
        del x
    return X, meta


class RowStream:
    """Row indices for stream positions 0, 1, 2, ...: a fresh seeded permutation of the cache
    for each pass over it. Positions must be asked for in increasing order."""

    def __init__(self, n_rows: int, seed: int):
        self.n = n_rows
        self.gen = torch.Generator().manual_seed(seed)
        self.perms: dict[int, torch.Tensor] = {}
        self.next_epoch = 0

    def _perm(self, epoch: int) -> torch.Tensor:
        while self.next_epoch <= epoch:
            self.perms[self.next_epoch] = torch.randperm(self.n, generator=self.gen)
            self.next_epoch += 1
        for e in [e for e in self.perms if e < epoch - 1]:
            del self.perms[e]
        return self.perms[epoch]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        pieces = []
        pos = start
        while pos < stop:
            epoch, off = divmod(pos, self.n)
            take = min(stop - pos, self.n - off)
            pieces.append(self._perm(epoch)[off:off + take])
            pos += take
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# --------------------------------------------------------------------------- helpers


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def apply_sets(sets: dict, targets: list) -> None:
    """Set each key on the first dataclass instance in targets that has that field."""
    for key, value in sets.items():
        for obj in targets:
            if key in {f.name for f in dataclasses.fields(obj)}:
                setattr(obj, key, value)
                break
        else:
            names = ", ".join(type(o).__name__ for o in targets)
            raise SystemExit(f"--set {key}: not a field of {names}")


def jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def batch_fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x = x.double()
    return float((x - x_hat.double()).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def encode_exported(t: dict[str, torch.Tensor], x: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """The documented inference convention, applied to the exported tensors."""
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if kind == "topk":
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    return pre.relu() * (pre > t["threshold"]).to(pre.dtype)


def check_export(t: dict[str, torch.Tensor], X: torch.Tensor, kind: str, k: int, rows: int) -> dict:
    rows = min(rows, X.shape[0])
    se = 0.0
    l0 = 0.0
    with torch.no_grad():
        x_all = X[:rows].double()
        var = float((x_all - x_all.mean(0)).pow(2).sum())
        for s in range(0, rows, 4096):
            x = X[s:s + 4096]
            z = encode_exported(t, x, kind, k)
            x_hat = z @ t["W_dec"] + t["b_dec"]
            se += float((x.double() - x_hat.double()).pow(2).sum())
            l0 += float((z != 0).sum())
    return {"rows": rows, "fvu": se / var, "mean_l0": l0 / rows}


def write_atomic(path: Path, write) -> None:
    """write(tmp) to a temporary name in the same folder, then os.replace it onto path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its files 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- saelens


def train_saelens(args, X: torch.Tensor, sets: dict) -> dict:
    from sae_lens import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TopKTrainingSAE,
                          TopKTrainingSAEConfig)
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d_in = X.shape[1]
    d_sae = d_in * args.expansion
    if args.kind == "topk":
        sae_cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=args.k, dtype="float32",
                                        device="cpu")
        sae_cls = TopKTrainingSAE
    else:
        sae_cfg = BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=float(args.k),
                                             dtype="float32", device="cpu")
        sae_cls = BatchTopKTrainingSAE
    default_lr = next(f.default for f in dataclasses.fields(SAETrainerConfig) if f.name == "lr")
    lr = default_lr if args.lr is None else args.lr
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.tokens,
        train_batch_size_samples=args.batch_size,
        lr=lr,
        lr_end=lr / 10,  # what LanguageModelSAERunnerConfig.__post_init__ sets
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
    )
    apply_sets(sets, [sae_cfg, trainer_cfg])
    if "lr" in sets and "lr_end" not in sets:
        trainer_cfg.lr_end = trainer_cfg.lr / 10
    if hasattr(sae_cfg, "add_training_info_to_metadata"):
        sae_cfg.add_training_info_to_metadata()

    torch.manual_seed(args.seed)
    sae = sae_cls(sae_cfg)

    stream = RowStream(X.shape[0], args.seed)
    if args.b_dec_init == "mean":
        # NOT a sae-lens default (it starts b_dec at 0): sparsify's init, for a like-for-like run
        with torch.no_grad():
            sae.b_dec.data.copy_(X[stream.rows(0, min(args.batch_size, args.tokens))].mean(0))

    def provider():
        pos = 0
        while True:
            # Exactly args.tokens rows for the training loop; after that (only reached if
            # something else draws from the provider first) keep cycling in full batches.
            stop = pos + args.batch_size
            if pos < args.tokens:
                stop = min(stop, args.tokens)
            yield X[stream.rows(pos, stop)]
            pos = stop

    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider())
    last = {}

    def step(batch):
        out = SAETrainer.step(trainer, batch)
        last.update(loss=out.loss.detach(), losses={n: v.detach() for n, v in out.losses.items()},
                    sae_in=out.sae_in.detach(), sae_out=out.sae_out.detach())
        return out

    trainer.step = step  # SAETrainer.step unchanged; only keeps the last step's loss and batch
    t0 = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - t0

    final = {
        "final_loss": float(last["loss"]),
        "final_loss_terms": {n: float(v) for n, v in last["losses"].items()},
        "final_batch_fvu": batch_fvu(last["sae_in"], last["sae_out"]),
        "steps": trainer.n_training_steps,
        "dead_latents": int(trainer.dead_neurons.sum()),
    }
    if args.kind == "batchtopk":
        final["topk_threshold"] = float(sae.topk_threshold)

    with torch.no_grad():
        state = {n: v.detach().clone() for n, v in sae.state_dict().items()}
        sae.process_state_dict_for_saving_inference(state)
    tensors = {n: state[n].to(torch.float32).contiguous()
               for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if args.kind == "batchtopk":
        thr = state["threshold"].to(torch.float32)
        if not torch.all(thr == thr.flatten()[0]):
            raise SystemExit("sae-lens threshold differs between latents; cannot export it 0-dim")
        tensors["threshold"] = thr.flatten()[0].clone()
    extra_unused = sorted(set(state) - set(tensors) - {"threshold"})
    b_dec_init = ("first-batch mean (--b-dec-init mean, not a sae-lens default)"
                  if args.b_dec_init == "mean" else "zeros (sae-lens default)")
    notes = ("sae-lens SAETrainer with a custom data provider; Adam, constant LR, grad clip 1.0, "
             f"AuxK coefficient {sae_cfg.aux_loss_coefficient} (dead after "
             f"{trainer_cfg.dead_feature_window} steps without firing), "
             f"rescale_acts_by_decoder_norm={sae_cfg.rescale_acts_by_decoder_norm} (folded into "
             "W_enc/b_enc at export), decoder_init_norm="
             f"{sae_cfg.decoder_init_norm}, b_dec init {b_dec_init}.")
    if args.kind == "batchtopk":
        notes += (f" BatchTopK: k*batch activations per batch; exported as JumpReLU with the "
                  f"learned threshold (EMA lr {sae_cfg.topk_threshold_lr}).")
    if extra_unused:
        notes += f" State-dict entries not exported: {extra_unused}."
    return dict(tensors=tensors, lr=trainer_cfg.lr, train_seconds=train_seconds, notes=notes,
                d_sae=d_sae, peer_config={"sae": jsonable(sae_cfg.to_dict()),
                                          "trainer": jsonable(trainer_cfg)}, **final)


# --------------------------------------------------------------------------- sparsify


def train_sparsify(args, X: torch.Tensor, sets: dict) -> dict:
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoderConfig, TrainConfig, Trainer
    from torch import nn

    hookpoint = "layers.0"

    class CachedActivations(nn.Module):
        """Stand-in for a Hugging Face model: input_ids are cache row indices, and the hooked
        module layers.0 outputs those rows' activations, [batch, seq, d_in]."""

        def __init__(self, acts: torch.Tensor):
            super().__init__()
            self.register_buffer("acts", acts, persistent=False)
            self.layers = nn.ModuleList([nn.Identity()])

        @property
        def base_model(self):
            return self

        @property
        def device(self):
            return self.acts.device

        @property
        def dummy_inputs(self):
            return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

        def forward(self, input_ids):
            return self.layers[0](self.acts[input_ids])

    stream = RowStream(X.shape[0], args.seed)

    class Positions(torch.utils.data.Dataset):
        """args.tokens stream positions; a DataLoader batch of B positions comes back as ONE
        sequence of B row indices ({"input_ids": [B]} -> collated to [1, B])."""

        def __len__(self):
            return args.tokens

        def __getitem__(self, i):
            return {"input_ids": stream.rows(i, i + 1)}

        def __getitems__(self, idx):
            start, stop = idx[0], idx[-1] + 1
            if stop - start != len(idx):
                raise RuntimeError("expected the sequential sampler sparsify's Trainer uses")
            return [{"input_ids": stream.rows(start, stop)}]

    sae_cfg = SparseCoderConfig(activation="topk", expansion_factor=args.expansion, k=args.k)
    cfg = TrainConfig(
        sae=sae_cfg,
        batch_size=args.batch_size,  # in "sequences"; here one sequence = the whole batch
        lr=args.lr,  # None -> sparsify picks it from the number of latents
        hookpoints=[hookpoint],
        init_seeds=[args.seed],
        log_to_wandb=False,
        save_every=2**62,
    )
    apply_sets(sets, [sae_cfg, cfg])

    with tempfile.TemporaryDirectory(prefix="sparsify-") as tmp:
        cfg.save_dir = tmp
        trainer = Trainer(cfg, Positions(), CachedActivations(X))
        trainer.save = lambda: None  # no checkpoints; the weights are taken from memory
        sae = trainer.saes[hookpoint]
        last = {}

        def record(module, _args, output):  # keeps detached copies only, not the graph
            last["out"] = type(output)(*(t.detach() for t in output))

        sae.register_forward_hook(record)
        seen = {}

        def record_batch(module, _args, output):
            seen["x"] = output.detach().flatten(0, 1)

        trainer.model.layers[0].register_forward_hook(record_batch)
        t0 = time.perf_counter()
        trainer.fit()
        train_seconds = time.perf_counter() - t0

    out = last["out"]
    loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8  # as Trainer sums it
    final = {
        "final_loss": float(loss),
        "final_loss_terms": {"fvu": float(out.fvu), "auxk_loss": float(out.auxk_loss),
                             "multi_topk_fvu": float(out.multi_topk_fvu)},
        "final_batch_fvu": batch_fvu(seen["x"], out.sae_out),
        "steps": trainer.global_step,
        "dead_latents": int((trainer.num_tokens_since_fired[hookpoint]
                             > cfg.dead_feature_threshold).sum()),
    }
    # base LR (a scheduler, as with optimizer=adam, keeps it as initial_lr and rescales "lr")
    lrs = sorted({g.get("initial_lr", g["lr"])
                  for opt in trainer.optimizers for g in opt.param_groups})
    schedule_free = False
    for opt in trainer.optimizers:
        if isinstance(opt, ScheduleFreeWrapper):
            opt.eval()  # as sparsify does before writing a checkpoint
            schedule_free = True
    with torch.no_grad():
        tensors = {
            "W_enc": sae.encoder.weight.detach().T.to(torch.float32).contiguous().clone(),
            "b_enc": sae.encoder.bias.detach().to(torch.float32).clone(),
            "W_dec": sae.W_dec.detach().to(torch.float32).contiguous().clone(),
            "b_dec": sae.b_dec.detach().to(torch.float32).clone(),
        }
        dec_norm = tensors["W_dec"].norm(dim=1)
    sf = " (ScheduleFree, averaged weights exported)" if schedule_free else ""
    notes = (f"sparsify Trainer.fit on a stand-in model serving the cached rows; optimizer "
             f"{cfg.optimizer}{sf}, "
             f"auxk_alpha {cfg.auxk_alpha} ({'AuxK off' if cfg.auxk_alpha == 0 else 'AuxK on'}), "
             f"dead_feature_threshold {cfg.dead_feature_threshold} tokens, multi_topk "
             f"{sae_cfg.multi_topk}, normalize_decoder {sae_cfg.normalize_decoder}; exported "
             f"decoder row norms in [{float(dec_norm.min()):.4f}, {float(dec_norm.max()):.4f}].")
    return dict(tensors=tensors, lr=lrs[0] if len(lrs) == 1 else lrs, train_seconds=train_seconds,
                notes=notes, d_sae=sae.num_latents,
                peer_config={"train": jsonable(cfg)}, **final)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", required=True, choices=sorted(PEER_DIST))
    p.add_argument("--kind", required=True, choices=["topk", "batchtopk"])
    p.add_argument("--cache", required=True, type=Path)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="default: the peer's own default")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the peer's config (repeatable)")
    p.add_argument("--check-rows", type=int, default=0,
                   help="re-encode this many cache rows with the saved tensors and record FVU")
    p.add_argument("--b-dec-init", choices=["peer", "mean"], default="peer",
                   help="saelens only: 'mean' sets b_dec to the first batch's mean before training "
                        "(sparsify's init; sae-lens starts it at zero). Default: the peer's own")
    p.add_argument("--progress", action="store_true", help="show the peers' tqdm bars")
    args = p.parse_args(argv)

    if args.peer == "sparsify" and args.kind == "batchtopk":
        print("sparsify (eai-sparsify) has no BatchTopK SAE: its SparseCoder activations are "
              "'topk' and 'groupmax' only. Nothing trained.", file=sys.stderr)
        return EXIT_UNSUPPORTED
    if args.peer == "sparsify" and args.b_dec_init != "peer":
        p.error("--b-dec-init is for saelens; sparsify starts b_dec at the first batch's mean")
    for name in ("expansion", "k", "batch_size", "tokens"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
    sets = parse_sets(args.sets)

    try:
        version = importlib.metadata.version(PEER_DIST[args.peer])
    except importlib.metadata.PackageNotFoundError:
        print(f"{PEER_DIST[args.peer]} is not installed in this python ({sys.executable}); run "
              f"benchmarks/peers/setup_{args.peer}.sh and use its venv", file=sys.stderr)
        return 1

    X, _meta = load_cache(args.cache)
    d_in = X.shape[1]
    if args.k > d_in * args.expansion:
        p.error("--k is larger than d_sae")

    train = train_saelens if args.peer == "saelens" else train_sparsify
    res = train(args, X, sets)
    tensors = res.pop("tensors")

    d_sae = res.pop("d_sae")
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
              "threshold": ()}
    for n, t in tensors.items():
        if tuple(t.shape) != shapes[n] or t.dtype != torch.float32:
            raise SystemExit(f"internal error: {n} has shape {tuple(t.shape)} {t.dtype}")

    encode = {
        "subtract_b_dec_from_input": True,
        "pre": "(x - b_dec) @ W_enc + b_enc",
        "activation": ("per-row top-k of pre, ReLU on the kept values, zeros elsewhere"
                       if args.kind == "topk" else "JumpReLU: relu(pre) * (pre > threshold)"),
        "decode": "z @ W_dec + b_dec",
    }
    summary = {
        "peer": args.peer,
        "version": version,
        "kind": args.kind,
        "d_in": d_in,
        "d_sae": d_sae,
        "k": args.k,
        "tokens": args.tokens,
        "batch_size": args.batch_size,
        "lr": res.pop("lr"),
        "train_seconds": res.pop("train_seconds"),
        "final_loss": res.pop("final_loss"),
        "notes": res.pop("notes"),
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cache": str(args.cache),
        "cache_rows": X.shape[0],
        "encode": encode,
        **res,
    }
    if args.check_rows > 0:
        summary["check"] = check_export(tensors, X, args.kind, args.k, args.check_rows)

    meta = {"peer": args.peer, "version": version, "kind": args.kind, "k": str(args.k),
            "encode": json.dumps(encode)}
    write_atomic(args.out, lambda tmp: save_file(tensors, tmp, metadata=meta))
    write_atomic(args.json, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    print(json.dumps({k: summary[k] for k in ("peer", "version", "kind", "d_sae", "lr",
                                              "train_seconds", "final_loss", "final_batch_fvu")}
                     | ({"check": summary["check"]} if "check" in summary else {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
