"""Hydra configs for every `flotilla` job (a package only so the YAML files install with the code)."""
