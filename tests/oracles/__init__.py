"""Independent references the model is held to: NumPy forward passes written from GPT-Neo's code."""
