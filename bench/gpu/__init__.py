"""Scripts that measure on a GPU (run by hand or in CI on a GPU machine; tested on the CPU with --smoke)."""
