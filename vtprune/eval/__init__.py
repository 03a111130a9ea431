"""Evaluation harness (FLOPs, latency and memory benchmarks, accuracy runs, sweeps, plots).

Nothing here is imported by `import vtprune`: the command line and the lmms-eval plugin load it."""
