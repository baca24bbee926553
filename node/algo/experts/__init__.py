"""Decentralized diffusion (Decentralized Diffusion Models, McAllister et al. 2025, arXiv 2501.05450) in small.

The data set is split into K clusters (cluster.py); one flow-matching expert per cluster is
trained in isolation, with no communication at all (flow.py); a router p(k | x_t, t) learns
which cluster a noisy sample comes from (router.py); at sampling time the experts' velocity
predictions are combined with the router's weights, top-1, top-k or the full ensemble
(ensemble.py). node/app/evaluate.py measures samples with a classifier trained in the same
run; node/net/experts/ serves experts and the router as live nodes.
Images live in [-1, 1] and are flattened; the nets (nets.py) are MLPs for 8x8 digits and small
convolutional U-Nets for 28x28 images (unet.py), both small enough for CPUs.
"""
