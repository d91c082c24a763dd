"""Step 4: XMedBench scoring (predictions through src/generation, answer extraction, scores), the chats. CLI:
``python -m src.evaluate.eval``."""
