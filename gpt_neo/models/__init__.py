"""Model math: pure functions over explicit parameter pytrees."""
