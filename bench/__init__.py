"""Benchmark scripts (run each as python bench/NAME.py); base.py is their shared harness."""
