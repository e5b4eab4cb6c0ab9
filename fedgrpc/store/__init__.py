"""What a run keeps on disk: the ledger, checkpoints, the run directory, safe writes."""
