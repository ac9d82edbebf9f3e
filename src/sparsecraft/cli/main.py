"""Entry point: ``sparsecraft <verb>``."""

from __future__ import annotations

import typer

from sparsecraft.cli.accelerate_cmd import accelerate_command
from sparsecraft.cli.activations_cmd import activations_command
from sparsecraft.cli.actsparse_cmd import actsparse_command
from sparsecraft.cli.demo_cmd import demo_command
from sparsecraft.cli.list_cmd import list_command
from sparsecraft.cli.oneshot_cmd import eval_command, sweep_command
from sparsecraft.cli.prune_cmd import prune_command
from sparsecraft.cli.report_cmd import report_command
from sparsecraft.cli.sae_cmd import sae_app
from sparsecraft.cli.search_cmd import search_command
from sparsecraft.cli.train_cmd import train_command

app = typer.Typer(
    name="sparsecraft",
    help="Make neural networks sparse, and make the sparsity pay off.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("demo")(demo_command)
app.command("prune")(prune_command)
app.command("report")(report_command)
app.command("eval")(eval_command)
app.command("sweep")(sweep_command)
app.command("train")(train_command)
app.command("search")(search_command)
app.command("accelerate")(accelerate_command)
app.command("activations")(activations_command)
app.command("actsparse")(actsparse_command)
app.command("list")(list_command)
app.add_typer(sae_app, name="sae")

if __name__ == "__main__":
    app()
