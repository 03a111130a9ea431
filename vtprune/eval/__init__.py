"""Evaluation harness (FLOPs, latency and memory benchmarks, accuracy runs, sweeps, plots).

Empty for now: the harness is tracked in its own issue; nothing here is imported by `vtprune`."""
