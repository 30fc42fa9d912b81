"""The Pareto registry on disk (or object storage): the front, its students, the experiment
folder. Readable without Ray and without training code (``lint-imports`` checks it)."""
