"""Step 4: XMedBench scoring (generation engine, answer extraction, scores). CLI: ``python -m src.evaluate.eval``."""
