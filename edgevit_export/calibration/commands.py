"""CLI commands of this package, registered on the main typer app by cli.py."""


def register(app, console, handle_errors) -> None:
    pass
