"""Training: losses live in ``rep_medsam_jax.losses``; here the steps, the optimiser, checkpoints,
sharding, configuration and the loop (``loop.train_and_evaluate``). See docs/training.md."""
