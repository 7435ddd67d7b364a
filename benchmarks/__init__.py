"""Measurement harnesses, benchmarks and evidence runs: outside the wheel; pi_lora never
imports this package. Run each as `python -m benchmarks.NAME`."""
