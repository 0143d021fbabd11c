"""The suite framework. Never imports methods/ or baselines/ (only hydra instantiate reaches them)."""
