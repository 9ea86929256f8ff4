# The two commands of the README. Both install into .venv first (a no-op once installed).
.PHONY: install up test bench
install:
	@bash scripts/install.sh

up: install
	.venv/bin/sovereign up

test: install
	.venv/bin/python -m pytest

# Each benchmark runs its peers side by side and prints ratios; see benchmarks/*/README.md.
bench: install
	bash benchmarks/serving/setup.sh && .venv/bin/python -m benchmarks.serving.run
	bash benchmarks/gateway/run.sh
	.venv/bin/python benchmarks/finetune/bench_train.py
