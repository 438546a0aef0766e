"""``python -m stem.cli`` (as ``make demo`` runs it)."""

from . import main

main(prog_name="stem")
