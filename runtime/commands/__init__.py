"""One module per `sagrt` subcommand: `add_arguments(parser)` and `run(args)`."""
