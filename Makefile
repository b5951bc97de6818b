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

# The main job on the embedded default. Until the shipped demo model lands, the
# embedded default is moecast's seeded synthetic trace generator, plus trace collection
# with the native runtime from a tiny random test checkpoint.
demo: build
	mkdir -p $(DEMO)
	$(BIN) trace synth -o $(DEMO)/synthetic.mctrace --layers 16 --experts 64 --top-k 4 --sequences 32 --tokens 256 --stickiness 0.35 --seed 0
	$(BIN) trace convert $(DEMO)/synthetic.mctrace -o $(DEMO)/synthetic.parquet
	$(BIN) trace import datasets/tests/fixtures/small.route.csv -o $(DEMO)/small-route.mctrace
	$(BIN) trace stats $(DEMO)/synthetic.mctrace --plot $(DEMO)/plots
	# The native runtime on a tiny random Qwen3-MoE test checkpoint (routing without structure).
	$(BIN) collect --model inference/tests/fixtures/hf/qwen3_moe --prompts prompts/demo.txt --max-new-tokens 16 -o $(DEMO)/fixture-qwen3moe.mctrace
	$(BIN) trace stats $(DEMO)/fixture-qwen3moe.mctrace --plot $(DEMO)/plots-fixture-qwen3moe
	@echo "demo outputs in $(DEMO)/ (charts in $(DEMO)/plots*/)"

test:
	$(CARGO) test --workspace

# Real routing traces from ../shared (not needed by the product; CI runs this when present).
test-real:
	@test -d $(SHARED)/traces || { echo "test-real needs $(SHARED)/traces"; exit 1; }
	MOECAST_SHARED=$(SHARED) $(CARGO) test --workspace --test real_traces -- --ignored --nocapture
	$(CARGO) build
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	for f in $$(find $(SHARED)/traces -type f ! -name LICENSE ! -name capture-metadata.json | sort); do \
	  $(DBG) trace import "$$f" -o "$$tmp/t.mctrace" >/dev/null 2>&1; \
	  printf '%-24s ' "$$(basename $$f)"; $(DBG) trace stats "$$tmp/t.mctrace" | grep '^overlap'; \
	done

# The runtime's transformers-parity tests on burn-wgpu. Without a GPU, Mesa's lavapipe
# (apt-get install mesa-vulkan-drivers libvulkan1) runs them on the CPU.
test-wgpu:
	mkdir -p $${XDG_RUNTIME_DIR:-/tmp/moecast-xdg}
	XDG_RUNTIME_DIR=$${XDG_RUNTIME_DIR:-/tmp/moecast-xdg} MOECAST_TEST_DEVICE=wgpu \
	  $(CARGO) test --workspace --features wgpu --test hf_parity

bench:
	$(CARGO) bench -p datasets --bench trace_io
	RAYON_NUM_THREADS=1 $(CARGO) bench -p collector --bench collect

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	rm -rf runs
	$(CARGO) clean
