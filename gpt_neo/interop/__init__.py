"""Other formats and tools: Hugging Face folders, GPT-Neo's Mesh-TensorFlow checkpoints, and
the LM Evaluation Harness."""
