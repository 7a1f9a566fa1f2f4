"""``python -m attnopt``: the command line without the console script."""

from attnopt.cli import app

app(prog_name="attnopt")
