"""Quality and cost metrics: cost (params, MACs, latency), frechet (generic Frechet distance
between Gaussian feature statistics) and classifier (the default's FID-like proxy: a small CNN
trained on the embedded data; NOT Inception FID). Submodules are imported on demand."""
