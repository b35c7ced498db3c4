# The two commands of the README. Each sets up what it needs first (scripts/bootstrap.sh).
PY := .venv/bin/python

.PHONY: bench test setup gpu-check clean demo test-timm docs docs-build

# The whole CPU table, each script rewriting its own sections of bench/RESULTS.md with the device,
# the versions and the date (bench/results.py; every script times through bench/measure.py): the
# logits kernels against the einsum and the composite (diagonal and full L), the fused
# cross-entropy, the fused top-k, backend="torch", then the module as users call it against
# nn.Linear, small heads to 100,000 classes. Long: the einsum baselines and the top-k at 10^6
# classes dominate.
bench: setup
	$(PY) -m bench.cpu_bench --write-results
	$(PY) -m bench.cpu_bench --full --write-results
	$(PY) -m bench.ce_bench --write-results
	$(PY) -m bench.topk_bench --write-results
	$(PY) -m bench.torch_bench --write-results
	$(PY) -m bench.head_bench --all --write-results

# TRITON_INTERPRET=1 makes the Triton kernels run on CPU tensors (set before anything imports triton).
# The documentation is built first, with warnings as errors, so a broken link or API reference fails
# the run that CI makes (about 20 s).
test: setup
	$(MAKE) --no-print-directory docs-build
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q

# The documentation site (docs/, mkdocs.yml) into site/, with warnings as errors (mkdocs --strict).
docs: setup docs-build

docs-build:
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

# The digits demo: three heads trained on scikit-learn's bundled digits, a table and demo_curves.png.
demo: setup
	$(PY) -m faim_kernels.demo

# The timm integration tests, in their own environment (.venv-timm: torch 2.14.1, torchvision, timm).
test-timm:
	bash scripts/test_timm.sh

# On a machine with a CUDA GPU: install, the test suite on the GPU, then the GPU benchmark, which
# writes bench/RESULTS.md's GPU section (bench/gpu_check.sh; --smoke runs it on CPU).
gpu-check:
	bash bench/gpu_check.sh

setup:
	@bash scripts/bootstrap.sh

clean:
	rm -rf build dist site *.egg-info faim_kernels/*.so faim_kernels/_C.build-info.json .pytest_cache
