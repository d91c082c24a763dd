"""Step 3: training (dense and Post-MoE) with accelerate + DeepSpeed. Entry point: ``python -m src.train.train``."""
