"""Engine: requests, scheduling, the model runner, sampling, and the offline / async front ends."""
