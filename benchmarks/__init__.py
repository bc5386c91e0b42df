"""Benchmarks: each module has ``run(device, quick) -> list[dict]`` and a ``__main__`` printing a table."""
