# moecast — see README.md. `make demo` runs the main pipeline, `make test` the tests.
CARGO  ?= cargo
TARGET := $(or $(CARGO_TARGET_DIR),target)
BIN    := $(TARGET)/release/moecast
DBG    := $(TARGET)/debug/moecast
SHARED ?= $(abspath ../shared)
DEMO   := runs/demo

.PHONY: all build demo test test-real test-wgpu bench fmt lint clean

all: build

build:
	$(CARGO) build --release

# The main job on the embedded default. The shipped tiny MoE (checkpoints/tiny-moe) runs
# over the demo prompts (8 seeded samples each) and, separately, over held-out prompts;
# its routing traces, statistics and charts land in runs/demo/. Then two expert
# predictors are trained on the demo-prompt traces (next-token and cross-layer
# lookahead) and evaluated against the baselines on the held-out traces (other prompts).
# Last, the held-out trace is replayed through an expert cache with each eviction policy
# and prefetcher (timing-honest), and a sweep over cache sizes is plotted.
# It uses the debug build shared with `make test` (tensor kernels are optimised even
# there, see Cargo.toml); `make build` gives the fully optimised binary.
MODEL  := checkpoints/tiny-moe
# Cache simulation of the demo model: experts of 3 x 128 x 128 bf16 weights (96 KiB, as the
# trace records from the checkpoint) move over a 16 GB/s link; 30 us of compute per layer.
SIM    := --bandwidth 16 --compute-us-per-layer 30
demo:
	$(CARGO) build
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(DBG) collect --model $(MODEL) --prompts prompts/demo.txt --samples 8 --max-new-tokens 100 --temperature 0.8 --seed 0 -o $(DEMO)/tiny-moe.mctrace
	$(DBG) collect --model $(MODEL) --prompts prompts/heldout.txt --samples 4 --max-new-tokens 100 --temperature 0.8 --seed 1000 -o $(DEMO)/heldout.mctrace
	$(DBG) trace convert $(DEMO)/tiny-moe.mctrace -o $(DEMO)/tiny-moe.parquet
	$(DBG) trace stats $(DEMO)/tiny-moe.mctrace --plot $(DEMO)/plots
	$(DBG) trace stats $(DEMO)/tiny-moe.mctrace --json > $(DEMO)/stats.json
	$(DBG) train --trace $(DEMO)/tiny-moe.mctrace --task next-token --test-fraction 0 -o $(DEMO)/predictor-next-token
	$(DBG) eval --predictor $(DEMO)/predictor-next-token --trace $(DEMO)/heldout.mctrace --json $(DEMO)/eval-next-token.json --plot $(DEMO)/plots
	$(DBG) train --trace $(DEMO)/tiny-moe.mctrace --task lookahead --test-fraction 0 -o $(DEMO)/predictor-lookahead
	$(DBG) eval --predictor $(DEMO)/predictor-lookahead --trace $(DEMO)/heldout.mctrace --json $(DEMO)/eval-lookahead.json --plot $(DEMO)/plots
	$(DBG) simulate --trace $(DEMO)/heldout.mctrace --predictor $(DEMO)/predictor-lookahead $(SIM) --cache 10%,25% --policy lru,lfu,belady --prefetch none,previous,coactivation,activation,learned,oracle --json $(DEMO)/simulate.json
	$(DBG) simulate --trace $(DEMO)/heldout.mctrace --predictor $(DEMO)/predictor-lookahead $(SIM) --sweep --policy lru,belady --prefetch none,learned,oracle --plot $(DEMO)/plots > $(DEMO)/sweep.txt
	@echo "demo outputs in $(DEMO)/: traces (.mctrace, .parquet), stats.json, predictor-*/, eval-*.json, simulate.json, sweep.txt, plots/"

test:
	$(CARGO) test --workspace

# Real routing traces from ../shared (not needed by the product; CI runs this when present).
test-real:
	@test -d $(SHARED)/traces || { echo "test-real needs $(SHARED)/traces"; exit 1; }
	MOECAST_SHARED=$(SHARED) $(CARGO) test --workspace --test real_traces --test real_sim -- --ignored --nocapture
	$(CARGO) build
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	for f in $$(find $(SHARED)/traces -type f ! -name LICENSE ! -name capture-metadata.json | sort); do \
	  $(DBG) trace import "$$f" -o "$$tmp/t.mctrace" >/dev/null 2>&1; \
	  printf '%-24s ' "$$(basename $$f)"; $(DBG) trace stats "$$tmp/t.mctrace" | grep '^overlap'; \
	done

# The runtime's transformers-parity tests and the predictor's tests on burn-wgpu. Without a GPU, Mesa's lavapipe
# (apt-get install mesa-vulkan-drivers libvulkan1) runs them on the CPU.
test-wgpu:
	mkdir -p $${XDG_RUNTIME_DIR:-/tmp/moecast-xdg}
	XDG_RUNTIME_DIR=$${XDG_RUNTIME_DIR:-/tmp/moecast-xdg} MOECAST_TEST_DEVICE=wgpu \
	  $(CARGO) test --workspace --features wgpu --test hf_parity --test predictor

bench:
	$(CARGO) bench -p datasets --bench trace_io
	RAYON_NUM_THREADS=1 $(CARGO) bench -p collector --bench collect
	$(CARGO) bench -p predictor --bench predictor -- train
	RAYON_NUM_THREADS=1 $(CARGO) bench -p predictor --bench predictor -- latency
	$(CARGO) bench -p inference --bench simulate

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	rm -rf runs
	$(CARGO) clean
