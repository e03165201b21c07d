"""Side-by-side benchmarks of aa-lightning against TRL (see benchmarks/README.md); not part of the package."""
