"""shira-diffusion benchmarks: `python -m benchmarks.<name> [--smoke]`; see benchmarks/README.md."""
