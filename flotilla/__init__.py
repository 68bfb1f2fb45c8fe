"""The `flotilla` command: one entry point that dispatches to the project's hydra jobs."""
