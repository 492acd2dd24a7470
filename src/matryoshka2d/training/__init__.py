"""Training: the config (TOML + dataclasses), set-up, the loop, checkpoints and interrupts."""
