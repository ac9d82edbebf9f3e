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
