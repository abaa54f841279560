"""GPU check cases of the Triton kernels, one module per dsv4/kernels/triton module: each has
`gpu_check_cases()`, a list of (name, callable) at DeepSeek-V4-Flash shapes whose callables return errors vs
the reference, the median time, bytes / FLOPs and roofline fractions (benchmarks/gpu_kernels_check.py runs
them on a GPU). Shared helpers (H200 peaks, timing, error / roofline fields) are in common.py."""
