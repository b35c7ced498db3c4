# The two commands of the README. Each sets up what it needs first (scripts/bootstrap.sh).
PY := .venv/bin/python

.PHONY: bench test setup gpu-check clean

bench: setup
	$(PY) -m bench.cpu_bench

# TRITON_INTERPRET=1 makes the Triton kernels run on CPU tensors (set before anything imports triton).
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q

setup:
	@bash scripts/bootstrap.sh

clean:
	rm -rf build faim_kernels/*.so .pytest_cache
