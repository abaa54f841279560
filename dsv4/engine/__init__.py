"""Engine: generation loops, sampling (the serving engine builds on these)."""
