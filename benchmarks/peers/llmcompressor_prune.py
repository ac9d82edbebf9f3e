"""Run llm-compressor's SparseGPT or Wanda on a model folder; runs inside benchmarks/.venvs/llmcompressor.

Usage: python llmcompressor_prune.py MODEL_DIR CALIB.pt METHOD SPARSITY PATTERN OUT_DIR RESULT.json
CALIB.pt holds the (nsamples, seqlen) calibration token ids that sparsecraft uses too, so both
tools see exactly the same tokens. The pruned model is saved uncompressed (dense safetensors with
zeros) and evaluated by the driver with sparsecraft's perplexity code, the same for both tools.
"""

import json
import resource
import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import WandaPruningModifier
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    model_dir, calib_path, method, sparsity, pattern, out_dir, result_path = sys.argv[1:8]
    torch.set_num_threads(int(sys.argv[8]) if len(sys.argv) > 8 else torch.get_num_threads())
    ids = torch.load(calib_path)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    structure = "0:0" if pattern == "unstructured" else pattern
    modifier_class = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[method]
    modifier = modifier_class(sparsity=float(sparsity), mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=modifier, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
    seconds = time.perf_counter() - start
    model.save_pretrained(out_dir, save_compressed=False)
    tokenizer.save_pretrained(out_dir)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(result_path, "w") as f:
        json.dump({"prune_seconds": seconds, "peak_rss_bytes": peak, "threads": torch.get_num_threads()}, f)


if __name__ == "__main__":
    main()
