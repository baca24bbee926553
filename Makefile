# The two commands a new user needs. Both create .venv and install atoll first.
.PHONY: demo test test-all lint install system-packages

install:
	bash scripts/install.sh

# A 4-node swarm on 127.0.0.1 (real DHT, gRPC, metrics) on scikit-learn digits, Dirichlet 0.5,
# compared with a centralized baseline trained in the same run.
demo: install
	.venv/bin/atoll swarm up --config examples/swarm4.yaml --out out/demo
	@bash scripts/next-steps.sh

# The Debian packages the tests need (scripts/system-packages.txt): installed where this machine
# allows it (root or password-less sudo); elsewhere one line says which, and their tests skip.
system-packages:
	bash scripts/system-packages.sh install

# The fast default test set (what CI runs).
test: install system-packages
	.venv/bin/python -m pytest -m "not slow" -q

# Everything, slow tests included (the chaos test: about 2.5 more minutes).
test-all: install system-packages
	.venv/bin/python -m pytest -q

# Formatting and lint (ruff, configured in pyproject.toml); CI runs it before the tests.
lint: install
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .
