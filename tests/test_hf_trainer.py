"""The transformers TrainerCallback steps a sparsifier inside Hugging Face's Trainer."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import sparsecraft as sc
from sparsecraft.integrations.hf_trainer import SparsifierCallback
from sparsecraft.methods.gmp import GradualMagnitudePruning


class Tokens(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (32, 16), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_gmp_inside_the_hf_trainer_reaches_its_target(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    model = LlamaForCausalLM(config)
    sparsifier = GradualMagnitudePruning(
        model, None, final_sparsity=0.75, start_step=1, frequency=2, n_prunes=3, types=["linear"], exclude=["lm_head"]
    )
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-3,
                             logging_steps=4, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    callback = SparsifierCallback(sparsifier)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    assert sparsifier.step_count == 8
    masks = sc.masks_of(model)
    assert len(masks) == 7  # q, k, v, o, gate, up, down of the one decoder layer
    for name, mask in masks.items():
        assert int(mask.sum()) == round(0.25 * mask.numel()), name
        weight = model.get_submodule(name.rsplit(".", 1)[0]).weight.detach()
        assert torch.count_nonzero(weight[~mask]) == 0, name
    assert callback.history[0][0] == 4 and 0.0 < callback.history[0][1] < 0.75  # mid-schedule at step 4
    assert callback.history[-1] == (8, 0.75)


def test_rigl_and_nm_training_inside_the_hf_trainer(tmp_path):
    from sparsecraft.methods.dst import RigL
    from sparsecraft.methods.nm_training import NMTraining, effective_groups_valid

    for kind in ("rigl", "nm"):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
        model = LlamaForCausalLM(config)
        if kind == "rigl":
            sparsifier = RigL(model, None, sparsity=0.75, total_steps=8, update_interval=2, types=["linear"], exclude=["lm_head"])
        else:
            sparsifier = NMTraining(model, None, n=2, m=4, total_steps=8, types=["linear"], exclude=["lm_head"])
        args = TrainingArguments(output_dir=str(tmp_path / kind), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-3,
                                 logging_steps=4, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
        callback = SparsifierCallback(sparsifier, finalize_at_end=True)
        Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback]).train()
        assert callback.history[-1][1] == 0.75 if kind == "rigl" else 0.5
        if kind == "rigl":
            assert [h["step"] for h in sparsifier.history] == [2, 4]  # updates stop at T_end = 75% = step 6
            assert all(h["moved"] > 0 for h in sparsifier.history)  # regrowth from the dense gradients the Trainer computed
        weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
        if kind == "nm":
            assert all(effective_groups_valid(w, 2, 4) for w in weights)
        else:  # ERK spreads the density unevenly over layers; the total stays at 25%
            assert sum(int((w != 0).sum()) for w in weights) <= round(0.25 * sum(w.numel() for w in weights)) + len(weights)
