.PHONY: setup demo test test-fast ci docs bench
setup: ; bash scripts/setup.sh
demo: ; bash scripts/demo.sh
test: ; bash scripts/test.sh
test-fast: ; bash scripts/test.sh --fast
ci: ; bash .ci/run
docs: setup ; .venv/bin/mkdocs serve
bench: setup ; .venv/bin/python benchmarks/overhead.py
