# moecast — see README.md. `make demo` runs the main pipeline, `make test` the tests.
CARGO  ?= cargo
TARGET := $(or $(CARGO_TARGET_DIR),target)
BIN    := $(TARGET)/release/moecast
DBG    := $(TARGET)/debug/moecast
SHARED ?= $(abspath ../shared)
DEMO   := runs/demo

.PHONY: all build demo demo-hidden llamacpp llamacpp-bench test test-ffi test-python test-llamacpp header test-real test-wgpu test-hook bench fmt lint clean

all: build

build:
	$(CARGO) build --release

# The main job on the embedded default. The shipped tiny MoE (checkpoints/tiny-moe) runs
# over the demo prompts (6 seeded samples each) and, separately, over held-out prompts,
# recording each MoE layer's router input too; its routing traces, statistics and charts
# land in runs/demo/. Then an expert predictor is trained on the demo-prompt traces
# (lookahead, reading the last routed layer's router input: it answers both the
# next-token and the cross-layer forecasts) and evaluated on the held-out traces against
# the baselines, the model's own cross-layer gate and the pre-attention gate among them.
# Then the model generates the held-out prompts with its experts offloaded to disk (25%
# resident, learned prefetch planned against the measured reads), and last the held-out
# trace is replayed through an expert cache with each eviction policy and prefetcher
# (timing-honest, the policy table: planned prefetch beside a fixed budget), again at a
# production expert size, and a sweep over cache sizes is plotted.
# It uses the debug build shared with `make test` (tensor kernels are optimised even
# there, see Cargo.toml), and steps that each use one core run side by side
# (tools/side_by_side.sh: the two collections; training beside the statistics; the
# engine run beside the evaluation; the sweep beside the policy table, their output shown
# after), to keep a fresh clone near its 10-minute budget on 2 cores (docs/results.md has the measured time). For the time budget the predictor is narrower and trains
# shorter than `make demo-hidden`'s; `make bench` measures speed with the optimised build.
# Training splits each batch into 2 data-parallel shards (--shards 2, as the 2-core
# default would), so its figures repeat exactly on machines with more cores too.
# Training hides 10% of the token ids (--token-dropout), so the predictor also forecasts
# each next token's first layer before its id is sampled. The engine run evicts by
# estimated next use and adds the logit lens's forecast of each next token's first layer.
MODEL  := checkpoints/tiny-moe
# Cache simulation of the demo model: experts of 3 x 128 x 128 bf16 weights (96 KiB, as the
# trace records from the checkpoint) move over a 16 GB/s link; 30 us of compute per layer.
SIM    := --bandwidth 16 --compute-us-per-layer 30
# The same routing at a production model's expert size (the 17.3 MB experts of the
# prefetch issue, over 25 GB/s, 300 us of compute per layer): fixed budgets make decoding
# slower than demand paging there; the planner (--budget auto) does not.
PROD   := --expert-bytes 17300000 --bandwidth 25 --compute-us-per-layer 300
demo:
	$(CARGO) build
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	tools/side_by_side.sh $(DEMO)/collect-heldout.log \
	  "$(DBG) collect --model $(MODEL) --prompts prompts/heldout.txt --samples 4 --max-new-tokens 100 --temperature 0.8 --seed 1000 --hidden-states -o $(DEMO)/heldout.mctrace" \
	  "$(DBG) collect --model $(MODEL) --prompts prompts/demo.txt --samples 6 --max-new-tokens 100 --temperature 0.8 --seed 0 --hidden-states -o $(DEMO)/tiny-moe.mctrace"
	tools/side_by_side.sh $(DEMO)/train.log \
	  "$(DBG) train --trace $(DEMO)/tiny-moe.mctrace --task lookahead --features hidden --hidden-width 256 --dropout 0.2 --token-dropout 0.1 --test-fraction 0 --epochs 10 --batch-size 4 --warmup-steps 50 --shards 2 -o $(DEMO)/predictor" \
	  "$(DBG) trace convert $(DEMO)/tiny-moe.mctrace -o $(DEMO)/tiny-moe.parquet && $(DBG) trace stats $(DEMO)/tiny-moe.mctrace --plot $(DEMO)/plots && $(DBG) trace stats $(DEMO)/tiny-moe.mctrace --json > $(DEMO)/stats.json"
	tools/side_by_side.sh $(DEMO)/run.log \
	  "$(DBG) run --model $(MODEL) --prompts prompts/heldout.txt --max-new-tokens 32 --expert-cache 25% --policy next-use --predictor $(DEMO)/predictor --lens --json $(DEMO)/run.json" \
	  "$(DBG) eval --predictor $(DEMO)/predictor --trace $(DEMO)/heldout.mctrace --model $(MODEL) --json $(DEMO)/eval.json --plot $(DEMO)/plots"
	tools/side_by_side.sh $(DEMO)/sweep.log \
	  "$(DBG) simulate --trace $(DEMO)/heldout.mctrace --predictor $(DEMO)/predictor $(SIM) --sweep --policy lru,belady --prefetch none,learned,oracle --plot $(DEMO)/plots > $(DEMO)/sweep.txt && $(DBG) simulate --trace $(DEMO)/heldout.mctrace --predictor $(DEMO)/predictor $(PROD) --cache 10%,25% --policy lru,lfu-kept,next-use --prefetch none,token,blend,learned,oracle --budget auto,2,4 --json $(DEMO)/simulate-production.json" \
	  "$(DBG) simulate --trace $(DEMO)/heldout.mctrace --predictor $(DEMO)/predictor --model $(MODEL) $(SIM) --cache 10%,25% --policy lru,lfu,lfu-kept,next-use,belady --prefetch none,previous,token,coactivation,blend,activation,gate,lens,learned,lens+learned,oracle --budget auto,2 --json $(DEMO)/simulate.json"
	@echo "demo outputs in $(DEMO)/: traces (.mctrace, .parquet), stats.json, predictor/, eval.json, simulate.json, simulate-production.json, sweep.txt, run.json, plots/"

# The shipped model in llama.cpp, end to end (runs/llamacpp/, about 3 minutes after the
# builds): export to GGUF (f32, f16), routing parity against `moecast collect` on the same
# token ids, routing collected from llama.cpp (with router inputs) over the demo and
# held-out prompts as `make demo` collects them, a predictor trained and evaluated on it
# (and an ids-only one beside it, predictor-ids, to compare in the C harness),
# then decoding inside llama.cpp with 10% and 25% of the experts resident in the page
# cache, without and with the predictor staging experts (3 alternating rounds each).
LLAMA    := runs/llamacpp
LLAMA_PY := python3 llamacpp/moecast_llamacpp.py
LLAMA_RUN := --prompts prompts/heldout.txt --max-new-tokens 32 --temperature 0.8 --seed 1000 --rounds 3
llamacpp:
	$(CARGO) build
	python3 -m pip install -q $(LLAMA_PIP) ./python
	rm -rf $(LLAMA) && mkdir -p $(LLAMA)
	python3 llamacpp/export_gguf.py --model $(MODEL) -o $(LLAMA)/tiny-moe.f32.gguf
	python3 llamacpp/export_gguf.py --model $(MODEL) --dtype f16 -o $(LLAMA)/tiny-moe.f16.gguf
	$(DBG) collect --model $(MODEL) --prompts prompts/heldout.txt --max-new-tokens 32 --hidden-states -o $(LLAMA)/moecast-heldout.jsonl
	python3 llamacpp/parity.py --reference $(LLAMA)/moecast-heldout.jsonl --model $(LLAMA)/tiny-moe.f32.gguf --json $(LLAMA)/parity-f32.json
	python3 llamacpp/parity.py --reference $(LLAMA)/moecast-heldout.jsonl --model $(LLAMA)/tiny-moe.f16.gguf --json $(LLAMA)/parity-f16.json
	$(LLAMA_PY) collect --model $(LLAMA)/tiny-moe.f32.gguf --prompts prompts/demo.txt --samples 6 --max-new-tokens 100 --temperature 0.8 --seed 0 --router-inputs --quiet -o $(LLAMA)/train.jsonl
	$(LLAMA_PY) collect --model $(LLAMA)/tiny-moe.f32.gguf --prompts prompts/heldout.txt --samples 4 --max-new-tokens 100 --temperature 0.8 --seed 1000 --router-inputs --quiet -o $(LLAMA)/heldout.jsonl
	$(DBG) trace convert $(LLAMA)/train.jsonl -o $(LLAMA)/train.mctrace
	$(DBG) trace convert $(LLAMA)/heldout.jsonl -o $(LLAMA)/heldout.mctrace
	$(DBG) train --trace $(LLAMA)/train.mctrace --task lookahead --features hidden --hidden-width 256 --dropout 0.2 --token-dropout 0.1 --test-fraction 0 --epochs 10 --batch-size 4 --warmup-steps 50 -o $(LLAMA)/predictor
	$(DBG) eval --predictor $(LLAMA)/predictor --trace $(LLAMA)/heldout.mctrace --json $(LLAMA)/eval.json
	$(DBG) train --trace $(LLAMA)/train.mctrace --task lookahead --token-dropout 0.1 --test-fraction 0 --epochs 10 --batch-size 4 --warmup-steps 50 --quiet -o $(LLAMA)/predictor-ids
	$(LLAMA_PY) prefetch --model $(LLAMA)/tiny-moe.f32.gguf --predictor $(LLAMA)/predictor --resident 10% $(LLAMA_RUN) --json $(LLAMA)/prefetch-10.json
	$(LLAMA_PY) prefetch --model $(LLAMA)/tiny-moe.f32.gguf --predictor $(LLAMA)/predictor --resident 25% $(LLAMA_RUN) --json $(LLAMA)/prefetch-25.json

# The same decoding at a production expert size (after `make llamacpp`): a Qwen3-MoE with
# Qwen3-30B-A3B's 2048 x 768 experts (9.4 MB each at f16) but the demo's 6 layers x 16
# experts and random weights, its routing forced to llama.cpp's held-out trace of the demo
# model (so the predictor's forecasts apply: it reads the trace's recorded router inputs,
# which the random model's own would not match), experts read from the GGUF file;
# then the same replay through the C harness (llamacpp/moecast_prefetch.c -p: libmoecast's
# C ABI reads the trace, plans and guards; no Python): by default forecasting in the eval
# callback while each layer's missing experts are read, llama.cpp on every core
# (bench-c-R.txt); with -a on a prefetcher thread of their own, llama.cpp on one thread
# fewer while forecasting (bench-c-R-a.txt); and by default on one llama.cpp thread
# (bench-c-R-j1.txt). The default run adds the oracle (planned from the trace's own
# experts) and prints each mode's share of its gain over on demand, and on demand with
# the least recently used expert dropped (on-demand-lru) and with the one expected latest
# (on-demand-next-use, moecast's estimate through mc_next_use_*) beside the default, the
# least frequently used (both harnesses' resident sets). The C runs have the
# modes take turns every 8 steps over the same tokens (-W 8: the machine's drift falls on
# every mode alike) and print 90% intervals over those windows; the Python runs
# alternate whole rounds, an even number of them, so a steady drift cancels.
llamacpp-bench: $(TARGET)/moecast_prefetch
	@test -f $(LLAMA)/heldout.mctrace || { echo "run make llamacpp first"; exit 1; }
	$(DBG) checkpoint synth --layers 6 --experts 16 --top-k 2 --vocab 4096 -o $(LLAMA)/synth
	python3 llamacpp/export_gguf.py --model $(LLAMA)/synth --tokenizer $(MODEL) --dtype f16 -o $(LLAMA)/synth.f16.gguf
	rm -rf $(LLAMA)/synth
	for r in 10 25 100; do $(LLAMA_PY) prefetch --model $(LLAMA)/synth.f16.gguf --replay $(LLAMA)/heldout.mctrace \
	  --replay-tokens 200 --predictor $(LLAMA)/predictor --resident $$r% --threads 2 --rounds 4 \
	  --json $(LLAMA)/bench-$$r.json || exit 1; done
	for r in 10 25 100; do for f in "" "-a" "-j 1"; do b=auto,1; test -n "$$f" -o $$r = 100 || b=lru,next-use,auto,1,oracle; \
	  $(TARGET)/moecast_prefetch -p $(LLAMA)/heldout.mctrace -N 200 -b $$b $$f -r $$r \
	  -R 2 -W 8 $(LLAMA)/synth.f16.gguf $(LLAMA)/predictor > $(LLAMA)/bench-c.tmp || { rm -f $(LLAMA)/bench-c.tmp; exit 1; }; \
	  out=$(LLAMA)/bench-c-$$r$$(echo "$$f" | tr -d ' ').txt; mv $(LLAMA)/bench-c.tmp $$out; cat $$out; done; done

# Activation-aware prediction on the demo model, all feature sets (`make demo` trains only
# the hidden-state one): the demo's collection with twice the samples per prompt (12:
# the predictors here are data-bound; with 6, +1-layer recall is 3 points lower), the
# same held-out prompts, one
# lookahead predictor per feature set (dropout 0.2 where router inputs are read; it
# costs the ids-only predictor 1.5 points), each evaluated with the
# cross-layer gate baseline (the model's own gates), and the cache simulation with the
# gate and the hidden-state predictor as prefetchers, then again with a third of each
# layer's time spent in attention before it routes, where the pre-attention gate can
# prefetch, and last with 4 experts prefetched per predicted layer, for the next layer
# only (--horizon 1: at that budget the next layer's reads fill the link and a 10%
# cache), both timings. Every predictor hides 10% of the token ids in training, so it
# also forecasts each next token's layer 0 before the id; the logit lens (lens+learned)
# forecasts it from the model's LM head, its candidates' layer-0 routing refined by the
# per-token counts of the predictor's training traces. Each simulation runs with LRU and with next-use
# eviction. 8-10 minutes after the build.
HID    := runs/demo-hidden
demo-hidden:
	$(CARGO) build
	rm -rf $(HID) && mkdir -p $(HID)
	$(DBG) collect --model $(MODEL) --prompts prompts/demo.txt --samples 12 --max-new-tokens 100 --temperature 0.8 --seed 0 --hidden-states -o $(HID)/tiny-moe.mctrace
	$(DBG) collect --model $(MODEL) --prompts prompts/heldout.txt --samples 4 --max-new-tokens 100 --temperature 0.8 --seed 1000 --hidden-states -o $(HID)/heldout.mctrace
	$(DBG) trace info $(HID)/tiny-moe.mctrace | tail -8
	for fd in ids:0 hidden:0.2 ids+hidden:0.2; do f=$${fd%:*}; \
	  $(DBG) train --trace $(HID)/tiny-moe.mctrace --task lookahead --features $$f --dropout $${fd#*:} --token-dropout 0.1 --test-fraction 0 --epochs 12 --batch-size 4 --warmup-steps 50 --quiet -o $(HID)/predictor-$$f && \
	  $(DBG) eval --predictor $(HID)/predictor-$$f --trace $(HID)/heldout.mctrace --model $(MODEL) --quiet --json $(HID)/eval-$$f.json --plot $(HID)/plots-$$f || exit 1; \
	done
	$(DBG) simulate --trace $(HID)/heldout.mctrace --predictor $(HID)/predictor-hidden --model $(MODEL) $(SIM) --cache 10%,25% --policy lru,next-use,belady --prefetch none,coactivation,gate,learned,lens+learned,oracle --json $(HID)/simulate.json
	$(DBG) simulate --trace $(HID)/heldout.mctrace --predictor $(HID)/predictor-hidden --model $(MODEL) --bandwidth 16 --compute-us-per-layer 20 --attention-us-per-layer 10 --cache 10%,25% --policy lru,next-use --prefetch none,gate,pre-attention,learned,gate+pre-attention,learned+pre-attention,lens+learned,oracle --json $(HID)/simulate-attention.json
	$(DBG) simulate --trace $(HID)/heldout.mctrace --predictor $(HID)/predictor-hidden --model $(MODEL) $(SIM) --budget 4 --horizon 1 --cache 10%,25% --policy lru,next-use --prefetch gate,learned,lens+learned,oracle --json $(HID)/simulate-budget4.json
	$(DBG) simulate --trace $(HID)/heldout.mctrace --predictor $(HID)/predictor-hidden --model $(MODEL) --bandwidth 16 --compute-us-per-layer 20 --attention-us-per-layer 10 --budget 4 --horizon 1 --cache 10%,25% --policy lru,next-use --prefetch learned,learned+pre-attention,lens+learned,oracle --json $(HID)/simulate-attention-budget4.json

# Every test target builds with the same package set (--workspace), so Cargo resolves
# one set of features and builds the dependencies once (a narrower set, e.g. -p or
# --exclude, rebuilds burn and polars).
# Every crate's tests but the C ABI's and the Python package's (`make test-ffi`, `make
# test-python`): their dependencies (pyo3, numpy, cbindgen) change the features of crates
# Burn depends on, so building them beside the rest recompiles Burn (about 7 minutes on
# 2 cores); without them `make test` reuses `make demo`'s build.
test:
	$(CARGO) test --workspace --exclude moecast-ffi --exclude moecast-python

# The C ABI (ffi/, libmoecast + ffi/include/moecast.h): the committed header is
# cbindgen's output of the source, a C program built with the system cc replays a trace
# through the library and must print what the Rust serving path forecasts, and bad
# arguments are error codes (ffi/tests/c_abi.rs); the blend, the planner and the guard
# through it decide as their Rust types (planning.rs); the next-use eviction estimates
# through it are the Rust ones (next_use.rs). `make header` rewrites the header after an
# API change.
test-ffi:
	$(CARGO) test --workspace --test c_abi --test planning --test next_use

# The Python package (python/, PyO3 + maturin): pip installs it from this clone (a dev
# build sharing target/ with `make test`), then pytest replays a trace of the shipped
# model through moecast.Predictor and checks its F1 equals `moecast eval`'s.
test-python:
	$(CARGO) test --workspace --no-run
	python3 -m pip install -q ./python pytest
	MOECAST_BIN=$(abspath $(DBG)) python3 -m pytest -q python/tests

# llama.cpp through llama-cpp-python (llamacpp/): pip builds llama.cpp from its source the
# first time (about 5 minutes on 2 cores; pip keeps the wheel for the next run). pytest
# exports the shipped model to GGUF (f32 and f16), checks llama.cpp tokenizes the
# held-out prompts as moecast does and routes their token ids as `moecast collect` does
# (>= 99% of top-k sets at f32; router inputs too), and that a predictor trained on
# llama.cpp's own routing, staging experts inside llama.cpp's eval callback, raises the
# share of experts resident when used: from Python and from C (the C harness below), by
# a fixed budget and by the planner.
LLAMA_PIP := llama-cpp-python==0.3.36 gguf==0.19.0 pytest
test-llamacpp:
	$(CARGO) test --workspace --no-run
	python3 -m pip install -q $(LLAMA_PIP) ./python
	$(MAKE) --no-print-directory $(TARGET)/moecast_prefetch
	MOECAST_BIN=$(abspath $(DBG)) MOECAST_PREFETCH_C=$(abspath $(TARGET))/moecast_prefetch python3 -m pytest -q -s llamacpp/tests

# The same prefetch harness in C (llamacpp/moecast_prefetch.c): llama.cpp from the wheel
# (its libllama and headers), the predictor through libmoecast's C ABI; no Python in the
# eval callback.
LLAMA_SP = $(shell python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
LLAMA_C = llamacpp/moecast_prefetch.c llamacpp/mode_round.c llamacpp/decoder.c llamacpp/expert_residency.c llamacpp/prefetcher.c llamacpp/step_log.c
$(TARGET)/moecast_prefetch: $(LLAMA_C) $(wildcard llamacpp/*.h) ffi/include/moecast.h
	$(CARGO) build --workspace
	cc -O2 -Wall -o $@ $(LLAMA_C) -I$(LLAMA_SP)/include -Iffi/include -L$(LLAMA_SP)/llama_cpp/lib -L$(TARGET)/debug \
	  -lllama -lggml -lggml-base -lmoecast -lpthread -lm -Wl,-rpath,$(LLAMA_SP)/llama_cpp/lib -Wl,-rpath,$(abspath $(TARGET))/debug

header:
	MOECAST_WRITE_HEADER=1 $(CARGO) test --workspace --test c_abi committed_header

# Real routing traces from ../shared (not needed by the product; CI runs this when present).
test-real:
	@test -d $(SHARED)/traces || { echo "test-real needs $(SHARED)/traces"; exit 1; }
	MOECAST_SHARED=$(SHARED) $(CARGO) test --workspace --test real_traces --test real_sim -- --ignored --nocapture
	$(CARGO) test --workspace --no-run
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	for f in $$(find $(SHARED)/traces -type f ! -name LICENSE ! -name capture-metadata.json | sort); do \
	  $(DBG) trace import "$$f" -o "$$tmp/t.mctrace" >/dev/null 2>&1; \
	  printf '%-24s ' "$$(basename $$f)"; $(DBG) trace stats "$$tmp/t.mctrace" | grep '^overlap'; \
	done

# The runtime's transformers-parity tests and the predictor's tests on burn-wgpu. Without a GPU, Mesa's lavapipe
# (apt-get install mesa-vulkan-drivers libvulkan1) runs them on the CPU.
# One test at a time: burn-cubecl's seed is process-wide (cubek::random::seed ignores the
# device), so tests training side by side would draw from each other's generator and the
# resume-equals-uninterrupted test could not hold.
test-wgpu:
	mkdir -p $${XDG_RUNTIME_DIR:-/tmp/moecast-xdg}
	XDG_RUNTIME_DIR=$${XDG_RUNTIME_DIR:-/tmp/moecast-xdg} MOECAST_TEST_DEVICE=wgpu \
	  $(CARGO) test --workspace --features wgpu --test hf_parity --test predictor -- --test-threads=1

# The transformers hook (collector/python/moecast_hook.py): its recorder against `moecast
# collect` on every fixture architecture, and its prefetch mode (ExpertOffloader: experts
# on a slow tier, staged by moecast.Predictor) on the fixtures. pip installs torch and
# transformers (the versions the fixtures were made with; about 5 GB with torch's CUDA
# libraries, which PyPI's Linux wheel requires even on CPU) and the moecast package.
test-hook:
	$(CARGO) build
	python3 -m pip install -q "torch==2.15.*" "transformers==5.24.*" safetensors tokenizers pytest ./python
	python3 tools/test_hook.py $(DBG)
	MOECAST_BIN=$(abspath $(DBG)) python3 -m pytest -q collector/python/tests

bench:
	$(CARGO) bench -p datasets --bench trace_io
	$(CARGO) bench -p datasets --bench dataset_scale
	RAYON_NUM_THREADS=1 $(CARGO) bench -p collector --bench collect
	RAYON_NUM_THREADS=1 $(CARGO) bench -p predictor --bench predictor -- train
	RAYON_NUM_THREADS=2 $(CARGO) bench -p predictor --bench predictor -- train
	RAYON_NUM_THREADS=1 $(CARGO) bench -p predictor --bench predictor -- latency
	$(CARGO) bench -p predictor --bench predictor -- scale
	$(CARGO) bench -p offload --bench simulate
	$(CARGO) bench -p offload --bench engine
	$(CARGO) build --release
	tools/replay_bench.sh $(BIN)

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	rm -rf runs
	$(CARGO) clean
