"""Training: the seed's two phases (freeze, fit; unfreeze from `fine_tune_at`, fit), checkpoints, and the run
that wraps them."""
