"""Check that `sparsecraft sae export` folders load in SAELens and compute the same function.

Run with our environment; it writes one export per architecture (random SAEs with non-zero
biases and thresholds) and a reference output beside each, then re-runs itself with the
sae-lens environment's python (benchmarks/peers/setup_saelens.sh) to load each folder with
``SAE.load_from_disk`` and compare its outputs with ours.

    python benchmarks/saelens_export_check.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAELENS = HERE / ".venvs" / "saelens" / "bin" / "python"
CASES = [("topk", False), ("relu", False), ("batchtopk", False), ("mutual_choice", False), ("relu", True),
         ("feature_choice", True)]


def write(root: Path) -> None:
    import torch

    from sparsecraft.methods.sae import SAEConfig, SparseAutoencoder
    from sparsecraft.methods.sae.io import export_saelens

    torch.manual_seed(0)
    for kind, transcoder in CASES:
        hook = "blocks.1.mlp_in" if transcoder else "blocks.1.resid_post"
        sae = SparseAutoencoder(SAEConfig(kind=kind, d_in=16, d_sae=64, k=5, transcoder=transcoder, hook=hook,
                                          target_hook="blocks.1.mlp_out" if transcoder else ""))
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_(0, 0.1)
            sae.threshold.uniform_(0, 0.5)
        out = root / f"{kind}{'-transcoder' if transcoder else ''}"
        export_saelens(sae, out)
        x = torch.randn(10, 16)
        torch.save({"x": x, "y": sae.eval()(x).detach()}, out / "reference.pt")


def load(root: Path) -> None:
    import torch
    from sae_lens import SAE

    worst = 0.0
    for out in sorted(p for p in root.iterdir() if p.is_dir()):
        ref = torch.load(out / "reference.pt")
        sae = SAE.load_from_disk(str(out))
        error = float((sae(ref["x"]).detach() - ref["y"]).abs().max())
        worst = max(worst, error)
        print(f"{out.name:24s} -> {type(sae).__name__:20s} max |difference| {error:.2e}")
    sys.exit(0 if worst < 1e-5 else 1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--load":
        load(Path(sys.argv[2]))
    else:
        if not SAELENS.exists():
            sys.exit("no sae-lens environment: bash benchmarks/peers/setup_saelens.sh")
        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp))
            sys.exit(subprocess.run([str(SAELENS), __file__, "--load", tmp]).returncode)
