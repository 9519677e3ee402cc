"""Load generation and benchmarks: anything that measures Duet from the outside."""
