# Thin wrappers a user can read. Everything runs inside .venv, created on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     ?= out

# glibc malloc: serve large blocks from the heap and keep freed memory, instead of an mmap + munmap per block of
# 32 MB or more, which page-faults gigabytes of fresh memory in every DP note-model step (expensive on virtual
# machines). bench/malloc.py measures it (README, Performance). A process keeps its peak heap until it exits.
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 68719476736
# Cache compiled bytecode even where the environment sets PYTHONDONTWRITEBYTECODE (this machine and its CI do):
# without it every process compiles torch, Opacus and pandas from source again, ≈ 25 s more per import here,
# and the federation starts a fresh Python process for every Flower message.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup demo demo-single demo-federated test test-slow bench clean

setup: $(STAMP)

# torch first, with pip, pinned to the CPU wheel (other specifiers pull gigabytes of CUDA libraries; pip finds the
# wheel on machines that keep it on disk). The rest with uv (same versions as pip picks; uv keeps the installed
# torch): ≈ 10 s where pip took ≈ 110 s here. No bytecode is compiled at install: Python writes it on first import
# (below), for the modules actually used, instead of all of torch's.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile torch==2.13.0
	$(BIN)/pip install -q uv && VIRTUAL_ENV=$(abspath $(VENV)) UV_LINK_MODE=copy $(BIN)/uv pip install -q -e '.[test]' \
	  || { echo "uv unavailable or failed: installing with pip (slower)"; $(BIN)/pip install -q -e '.[test]'; }
	touch $(STAMP)

# The main job: the NAFLD cohort split into 3 hospitals on 127.0.0.1 — flower-superlink + 3 flower-supernode
# (TLS + node auth), `flwr run`, DP training at every site, audits at every site, signed release in
# $(OUT)/federated/run/release, all processes stopped, summary printed (see deploy/README.md).
demo: demo-federated

# Single-site pipeline on the embedded NAFLD cohort: data -> DP training -> synthetic -> utility report ->
# audit -> signed release -> verify, all under $(OUT)/.
demo-single: $(STAMP)
	$(BIN)/dpsynth demo --out $(OUT)

demo-federated: $(STAMP)
	$(BIN)/python -m deploy demo --out $(OUT)/federated

# three workers on the machine's 2 cores (every test process runs one thread: tests/conftest.py), one test file
# per worker so that the real-process consortium fixture is started once. That consortium's worker mostly waits
# (Flower heartbeats, message round trips), so a third worker fills its idle core. From a fresh clone on one slow
# machine (2026-11-27): pytest 10:35, 11:18 with set-up, where two workers with two-thread pools took 15:33 /
# 16:26. Files go out longest first (tests/conftest.py: LONGEST_FIRST; --no-loadscope-reorder keeps that order).
# --durations: the slowest tests go into the log (CI's budget is 15 min on 2 cores)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=20

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python bench/malloc.py
	$(BIN)/python bench/dp_overhead.py
	$(BIN)/python bench/utility.py
	$(BIN)/python bench/vitals.py
	$(BIN)/python bench/notes.py
	$(BIN)/python bench/notes_guidance.py
	$(BIN)/python bench/audit_speed.py
	$(BIN)/python bench/audit_controls.py
	$(BIN)/python bench/demo_fed.py
	$(BIN)/python bench/federated_vs_central.py
	$(BIN)/python bench/summarize.py

clean:
	rm -rf $(OUT) .pytest_cache
