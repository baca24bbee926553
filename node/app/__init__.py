"""Application: what a person runs. The command line (cli.py), the local swarm launcher
(swarm.py), console output (console.py), benchmarks (bench/), plots (plotting.py, grid.py), the
judge that scores generated images (evaluate.py) and Prometheus targets from the DHT
(prometheus_sd.py). It may import every layer below."""
