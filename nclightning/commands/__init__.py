"""Non-Trainer subcommands of the ``nclightning`` CLI (``theory``, ``report``).

Each module here exposes ``main(argv: list[str]) -> int`` and is dispatched by
:func:`nclightning.cli.main` before LightningCLI sees the arguments.
"""
