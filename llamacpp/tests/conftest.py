"""What the llama.cpp suites share: paths, the `moecast` binary and the tools, and one
work directory for the whole session (the GGUF exports and moecast's routing of the
held-out prompts; test_llamacpp.py trains the predictor there that test_llamacpp_c.py's
harness tests read)."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "llamacpp"))
BIN = os.environ.get("MOECAST_BIN", str(ROOT / "target" / "debug" / "moecast"))
MODEL = ROOT / "checkpoints" / "tiny-moe"
HELDOUT = ROOT / "prompts" / "heldout.txt"

import export_gguf  # noqa: E402
import parity  # noqa: E402


def run(*args):
    return subprocess.run([BIN, *map(str, args)], check=True, capture_output=True, text=True).stdout


def tool(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "llamacpp" / script), *map(str, args)],
                          check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="session")
def work():
    # Beside the clone rather than in the temporary directory: residency is read from the
    # page cache, which a tmpfs /tmp would not let go of.
    (ROOT / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "runs", prefix="test-llamacpp-") as tmp:
        yield from _work(Path(tmp))


def _work(d):
    for dtype in ("f32", "f16"):
        export_gguf.export(str(MODEL), str(d / f"tiny.{dtype}.gguf"), dtype)
    # moecast's own routing of the held-out prompts, greedy
    run("collect", "--model", MODEL, "--prompts", HELDOUT, "--max-new-tokens", "32", "--hidden-states",
        "-o", d / "ref.jsonl")
    parity.prompts_from_trace(str(d / "ref.jsonl"), str(d / "ref-ids.jsonl"))
    yield d


def covered(mode):
    """The share of uses whose expert was resident or its read issued ahead (what the
    harness decides; whether a read landed in time is the machine's speed)."""
    return mode["resident_when_used"] + mode["late_staged"]
