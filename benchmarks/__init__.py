"""Speed and memory measurements of fopro (see benchmarks/README.md); not part of the installed package."""
