"""Quality and cost metrics: cost (params, MACs, latency), stats (the Frechet distance of
Gaussian feature statistics, IS, precision/recall, KID, bootstrap intervals) and classifier (the
default's FID-like proxy: a small CNN trained on the embedded data; NOT Inception FID).
Submodules are imported on demand."""
